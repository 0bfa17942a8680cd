"""Small random-weight checkpoints in the upstream formats that VBench's dimension code loads.

Each writer puts a file under the same relative path, with the same container format and the same
state-dict key layout as the published weights (``harness.vbench.dimensions``), so VBench's real
loading code reads it. Where that code infers the architecture from the tensors (OpenAI CLIP,
the harness's DINO loader) the networks are tiny; where the architecture is fixed in code (AMT-S,
RAFT, MUSIQ, the aesthetic head) it is the real one. The scores such weights give mean nothing;
the plumbing is real.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from harness.vbench import dimensions as dims

TINY_WIDTH = 64  # CLIP and DINO derive heads as width // 64


def _target(cache: Path, weight: dims.WeightFile) -> Path:
    path = Path(cache) / weight.path
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_clip(cache: Path, weight: dims.WeightFile, embed_dim: int) -> Path:
    """A tiny OpenAI CLIP ViT (224 px, patch 32, one block per tower) as a TorchScript archive,
    the format of the published ``ViT-*.pt`` files (float32 here, float16 upstream)."""
    from clip.model import CLIP

    torch.manual_seed(1)
    model = CLIP(
        embed_dim=embed_dim, image_resolution=224, vision_layers=1, vision_width=TINY_WIDTH,
        vision_patch_size=32, context_length=77, vocab_size=49408,
        transformer_width=TINY_WIDTH, transformer_heads=TINY_WIDTH // 64, transformer_layers=1,
    ).eval()
    image = torch.zeros(1, 3, 224, 224)
    text = torch.zeros(1, 77, dtype=torch.long)
    text[0, :3] = torch.tensor([49406, 320, 49407])
    with torch.no_grad():
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    path = _target(cache, weight)
    torch.jit.save(traced, str(path))
    return path


def write_aesthetic_head(cache: Path) -> Path:
    """LAION's aesthetic predictor: ``nn.Linear(768, 1)`` state dict."""
    torch.manual_seed(2)
    head = torch.nn.Linear(768, 1)
    path = _target(cache, dims.AESTHETIC_HEAD)
    torch.save(head.state_dict(), path)
    return path


def write_dino(cache: Path, depth: int = 2) -> Path:
    """A DINO ViT backbone state dict (DINO's key names) with a tiny width, patch 16, 224 px."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=TINY_WIDTH, depth=depth,
                            num_heads=TINY_WIDTH // 64, num_classes=0, qkv_bias=True)
    # random, not timm's zero/trunc-normal init: gives the tokens distinct features
    state = {k: torch.randn_like(v) * 0.05 if k.endswith("pos_embed") or k == "cls_token" else v
             for k, v in vit.state_dict().items()}
    path = _target(cache, dims.DINO_B16)
    torch.save(state, path)
    return path


def write_musiq(cache: Path) -> Path:
    """pyiqa's MUSIQ (the real architecture: the file's layout is fixed in pyiqa's code)."""
    from pyiqa.archs.musiq_arch import MUSIQ

    torch.manual_seed(4)
    path = _target(cache, dims.MUSIQ_SPAQ)
    torch.save(MUSIQ(pretrained=False, num_class=1).state_dict(), path)
    return path


def write_amt(cache: Path) -> Path:
    """AMT-S (vbench/third_party/amt) as ``{"state_dict": ...}``, the published layout."""
    from omegaconf import OmegaConf
    from vbench.third_party.amt.utils.build_utils import build_from_cfg

    torch.manual_seed(5)
    config = dims.submodule_args("motion_smoothness", cache)["config"]
    model = build_from_cfg(OmegaConf.load(config).network)
    path = _target(cache, dims.AMT_S)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def write_raft(cache: Path) -> Path:
    """RAFT (vbench/third_party/RAFT, full model) with the ``module.`` prefixes of the published
    checkpoint, which was saved from ``nn.DataParallel``."""
    from easydict import EasyDict
    from vbench.third_party.RAFT.core.raft import RAFT

    torch.manual_seed(6)
    model = RAFT(EasyDict(small=False, mixed_precision=False, alternate_corr=False))
    path = _target(cache, dims.RAFT_THINGS)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    return path


def write_all(cache: str | os.PathLike) -> dict[str, Path]:
    """Every weight file of the seven tested dimensions; returns relative path -> file."""
    from harness.vbench.upstream import prepare_vbench

    prepare_vbench()  # clip's __init__ needs pkg_resources; vbench's needs decord or a stand-in
    cache = Path(cache)
    written = [
        write_clip(cache, dims.CLIP_B32, embed_dim=512),
        write_clip(cache, dims.CLIP_L14, embed_dim=768),  # the aesthetic head reads 768 features
        write_aesthetic_head(cache),
        write_dino(cache),
        write_musiq(cache),
        write_amt(cache),
        write_raft(cache),
    ]
    return {str(p.relative_to(cache)): p for p in written}
