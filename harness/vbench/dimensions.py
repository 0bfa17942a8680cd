"""What each VBench dimension needs: weight files, prompt information, frames, and the arguments
its ``vbench.<dimension>.compute_<dimension>`` function receives.

The weight files, their places under the cache folder and their upstream addresses are those of
``vbench/utils.py: init_submodules`` (vbench 0.1.5), which downloads what is absent with
wget/git. The harness never lets it: it checks the files first (``missing_weights``) and builds
the arguments itself (``submodule_args``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from harness.vbench.scoring import ALL_DIMENSIONS, QUALITY_DIMENSIONS
from harness.vbench.upstream import package_file

DINO_HUB_DIR = Path(__file__).resolve().parent / "dino_hub"


@dataclass(frozen=True)
class WeightFile:
    """One file VBench loads from its cache folder."""

    path: str  # relative to the cache folder
    url: str  # where upstream fetches it
    description: str
    note: str = ""  # how to put it in place when it is not a plain download


@dataclass(frozen=True)
class Dimension:
    name: str
    weights: tuple[WeightFile, ...] = ()
    # needs the standard suite's per-prompt auxiliary information (VBench refuses custom input)
    needs_prompt_info: bool = False
    # its aggregate is VBench's sum over frame pairs / number of pairs (weight = frames - 1)
    frame_weighted: bool = False
    # per-video value x scale = the aggregate's scale (imaging quality reports per video in 0-100)
    per_video_scale: float = 1.0
    min_frames: int = 2
    # its flow networks build a 4-level correlation pyramid at 1/8 resolution
    min_side: int = 1
    requires: str = ""  # what else it needs beyond the weight files

    @property
    def category(self) -> str:
        return "quality" if self.name in QUALITY_DIMENSIONS else "semantic"


_CLIP = "https://openaipublic.azureedge.net/clip/models"
_HF_VBENCH = "https://huggingface.co/OpenGVLab/VBench_Used_Models/resolve/main"

CLIP_B32 = WeightFile(
    "clip_model/ViT-B-32.pt",
    f"{_CLIP}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "OpenAI CLIP ViT-B/32 (TorchScript archive)",
)
CLIP_L14 = WeightFile(
    "clip_model/ViT-L-14.pt",
    f"{_CLIP}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "OpenAI CLIP ViT-L/14 (TorchScript archive)",
)
AESTHETIC_HEAD = WeightFile(
    "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth",
    "https://github.com/LAION-AI/aesthetic-predictor/blob/main/sa_0_4_vit_l_14_linear.pth?raw=true",
    "LAION aesthetic predictor: linear head on CLIP ViT-L/14 image embeddings",
)
DINO_B16 = WeightFile(
    "dino_model/dino_vitbase16_pretrain.pth",
    "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
    "DINO ViT-B/16 backbone",
    "the DINO code is supplied by the harness (no clone of the DINO repository is needed)",
)
MUSIQ_SPAQ = WeightFile(
    "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",
    "https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/"
    "musiq_spaq_ckpt-358bb6af.pth",
    "MUSIQ image-quality model trained on SPAQ (pyiqa)",
)
AMT_S = WeightFile(
    "amt_model/amt-s.pth",
    "https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth",
    "AMT-S frame interpolation",
)
RAFT_THINGS = WeightFile(
    "raft_model/models/raft-things.pth",
    "https://dl.dropboxusercontent.com/s/4j4z58wuv8o0mfz/models.zip",
    "RAFT optical flow (FlyingThings)",
    "the URL is models.zip: unzip it into raft_model/ (it holds models/raft-things.pth)",
)
UMT_L16 = WeightFile(
    "umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth",
    f"{_HF_VBENCH}/l16_ptk710_ftk710_ftk400_f16_res224.pth",
    "UMT-L/16 video classifier (Kinetics-400)",
)
GRIT = WeightFile(
    "grit_model/grit_b_densecap_objectdet.pth",
    "https://datarelease.blob.core.windows.net/grit/models/grit_b_densecap_objectdet.pth",
    "GRiT dense captioning / object detection",
)
TAG2TEXT = WeightFile(
    "caption_model/tag2text_swin_14m.pth",
    "https://huggingface.co/spaces/xinyu1205/recognize-anything/resolve/main/tag2text_swin_14m.pth",
    "Tag2Text Swin-B captioner",
)
VICLIP = WeightFile(
    "ViCLIP/ViClip-InternVid-10M-FLT.pth",
    f"{_HF_VBENCH}/ViClip-InternVid-10M-FLT.pth",
    "ViCLIP video-text model (InternVid-10M-FLT)",
)
VICLIP_BPE = WeightFile(
    "ViCLIP/bpe_simple_vocab_16e6.txt.gz",
    "https://raw.githubusercontent.com/openai/CLIP/main/clip/bpe_simple_vocab_16e6.txt.gz",
    "CLIP BPE vocabulary for the ViCLIP tokenizer",
    "the installed openai-clip package ships it (clip/bpe_simple_vocab_16e6.txt.gz): copy it",
)

_BERT = "Hugging Face 'bert-base-uncased' in the local HF cache (HF_HUB_OFFLINE=1)"
_GRIT_REQUIRES = f"detectron2 (not on PyPI: build it from source) and {_BERT}"

DIMENSIONS: dict[str, Dimension] = {
    d.name: d
    for d in (
        Dimension("subject_consistency", (DINO_B16,), frame_weighted=True),
        Dimension("background_consistency", (CLIP_B32,), frame_weighted=True),
        Dimension("temporal_flickering"),
        Dimension("motion_smoothness", (AMT_S,), min_frames=3, min_side=64),
        Dimension("aesthetic_quality", (CLIP_L14, AESTHETIC_HEAD)),
        Dimension("imaging_quality", (MUSIQ_SPAQ,), per_video_scale=0.01),
        Dimension("dynamic_degree", (RAFT_THINGS,), min_side=64),
        Dimension("object_class", (GRIT,), needs_prompt_info=True, requires=_GRIT_REQUIRES),
        Dimension("multiple_objects", (GRIT,), needs_prompt_info=True, requires=_GRIT_REQUIRES),
        Dimension("human_action", (UMT_L16,), requires="numpy<2 (its UMT code imports "
                  "numpy.lib.function_base)"),
        Dimension("color", (GRIT,), needs_prompt_info=True, requires=_GRIT_REQUIRES),
        Dimension("spatial_relationship", (GRIT,), needs_prompt_info=True,
                  requires=_GRIT_REQUIRES),
        Dimension("scene", (TAG2TEXT,), needs_prompt_info=True, requires=f"fairscale and {_BERT}"),
        Dimension("appearance_style", (CLIP_B32,), needs_prompt_info=True),
        Dimension("temporal_style", (VICLIP, VICLIP_BPE)),
        Dimension("overall_consistency", (VICLIP, VICLIP_BPE)),
    )
}
assert tuple(sorted(DIMENSIONS)) == tuple(sorted(ALL_DIMENSIONS))


def get(name: str) -> Dimension:
    if name not in DIMENSIONS:
        raise ValueError(f"dimension: got {name!r}, expected one of {list(ALL_DIMENSIONS)}")
    return DIMENSIONS[name]


def missing_weights(name: str, cache_dir: str | Path) -> list[WeightFile]:
    """The weight files of ``name`` absent from ``cache_dir``."""
    return [w for w in get(name).weights if not (Path(cache_dir) / w.path).is_file()]


def submodule_args(name: str, cache_dir: str | Path):
    """The ``submodules_list`` argument of ``compute_<name>`` in vbench's local mode, pointing at
    files under ``cache_dir`` (subject consistency: at the harness's DINO hub folder)."""
    cache = Path(cache_dir)
    get(name)
    if name == "temporal_flickering":
        return []
    if name == "background_consistency":
        return [str(cache / CLIP_B32.path), False]  # [model path, read_frame]
    if name == "subject_consistency":
        return {
            "repo_or_dir": str(DINO_HUB_DIR),
            "path": str(cache / DINO_B16.path),
            "model": "dino_vitb16",
            "source": "local",
            "read_frame": False,
        }
    if name == "motion_smoothness":
        config = package_file("third_party", "amt", "cfgs", "AMT-S.yaml")  # ships with vbench
        return {"config": str(config), "ckpt": str(cache / AMT_S.path)}
    if name == "dynamic_degree":
        return {"model": str(cache / RAFT_THINGS.path)}
    if name == "aesthetic_quality":
        return [str(cache / CLIP_L14.path), str(cache / Path(AESTHETIC_HEAD.path).parent)]
    if name == "imaging_quality":
        return {"model_path": str(cache / MUSIQ_SPAQ.path)}
    if name == "human_action":
        return [str(cache / UMT_L16.path)]
    if name in ("object_class", "multiple_objects", "color", "spatial_relationship"):
        return {"model_weight": str(cache / GRIT.path)}
    if name == "scene":
        return {"pretrained": str(cache / TAG2TEXT.path), "image_size": 384, "vit": "swin_b"}
    if name == "appearance_style":
        return {"name": str(cache / CLIP_B32.path)}
    return {"pretrain": str(cache / VICLIP.path)}  # temporal_style, overall_consistency
