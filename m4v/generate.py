"""Text -> video from a training checkpoint: a Python API and ``python -m m4v.generate``.

    python -m m4v.generate --checkpoint runs/default --prompt "a red circle moves up on a blue
        background" --num-samples 4 --out videos/
    python -m m4v.generate --checkpoint runs/default --prompts prompts.txt --out videos/ \\
        --steps 4,4,4 --first-frame-steps 8,8,8            # fewer sampler steps
    torchrun --nproc_per_node 8 -m m4v.generate ...         # each rank writes its share

Everything (model, text encoder, codec, sampler defaults) is rebuilt from the checkpoint folder's
``config.json``; ``--checkpoint`` may name a run folder (its latest checkpoint is used) or one
checkpoint folder.

Files are named ``{prompt}-{i}.mp4``, VBench's naming, ``i`` in ``0 .. num_samples-1``. The
prompt is used verbatim except for what a Linux filesystem forbids in a file name: ``/`` and NUL
become ``_``, and a name longer than 255 bytes has its prompt part cut at a character boundary
(two prompts that collide after this are rejected, not overwritten).

Resumable and reproducible: a video that already exists and decodes is skipped, and video
``(prompt, i)`` is sampled with its own generator seeded from ``(seed, prompt, i)``, one video
per sampler call, so its content does not depend on batching, sharding, skipping or order. Videos
are written atomically (temporary file + rename). With ``world_size`` W, rank r makes the items
``r, r + W, ...`` of the (prompt, i) list, so evaluation splits over ranks or machines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from m4v.train.checkpoint import find_checkpoint, load_weights, read_checkpoint_info
from m4v.train.components import (
    build_codec,
    build_model,
    build_sampler,
    build_text_encoder,
    text_encoder_trainable,
)
from m4v.train.distributed import resolve_device
from m4v.train.objectives import FlowMatchingObjective
from m4v.video_io import video_decodes, write_video

_MAX_NAME_BYTES = 255


def video_filename(prompt: str, index: int) -> str:
    """``{prompt}-{index}.mp4`` with ``/`` and NUL replaced and the name cut to 255 bytes."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt: got {prompt!r}, expected a non-empty string")
    safe = prompt.replace("/", "_").replace("\0", "_")
    suffix = f"-{index}.mp4"
    budget = _MAX_NAME_BYTES - len(suffix.encode())
    encoded = safe.encode()
    if len(encoded) > budget:
        safe = encoded[:budget].decode("utf-8", errors="ignore")
    return safe + suffix


def sample_seed(seed: int, prompt: str, index: int) -> int:
    """The 63-bit seed of video ``(prompt, index)``."""
    digest = hashlib.sha256(f"{seed}\0{prompt}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _dist_env(rank: int | None, world_size: int | None) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank/world_size: got {rank}/{world_size}, expected 0 <= rank < "
                         "world_size")
    return rank, world_size


class TextToVideo:
    """The generation pipeline of one checkpoint: text encoder -> sampler -> codec decode.

    Args:
        checkpoint: a run folder or a checkpoint folder.
        weights: ``"ema"`` or ``"model"``; default: the run's ``sample.weights``.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda:1"``...
        num_frames: video frames to generate; default: the training clip length.
        sampler options (``steps``, ``first_frame_steps``, ``guidance``, ``first_frame_guidance``):
            override the run's ``sample`` settings.
    """

    def __init__(self, checkpoint: str | os.PathLike, *, weights: str | None = None,
                 device: str = "auto", num_frames: int | None = None,
                 steps: Sequence[int] | None = None,
                 first_frame_steps: Sequence[int] | None = None,
                 guidance: float | None = None, first_frame_guidance: float | None = None,
                 progress: bool = False):
        self.checkpoint = find_checkpoint(checkpoint)
        info = read_checkpoint_info(self.checkpoint)
        cfg = self.cfg = info.config
        if cfg.stage != "t2v":
            raise ValueError(f"checkpoint: {self.checkpoint} is a {cfg.stage!r} run; generation "
                             "needs a text-to-video ('t2v') run")
        self.step = info.step
        self.device = resolve_device(device)
        self.codec = build_codec(cfg).to(self.device)
        encoder = build_text_encoder(cfg)
        if text_encoder_trainable(cfg):
            wrapper = FlowMatchingObjective(build_model(cfg), None, text_encoder=encoder)
        else:
            wrapper = FlowMatchingObjective(build_model(cfg), None, frozen_text_encoder=encoder)
            encoder.to(self.device)
        load_weights(self.checkpoint, wrapper, weights or cfg.sample.weights)
        self.wrapper = wrapper.to(self.device).eval()
        self.sampler = build_sampler(cfg, progress=progress, steps=steps,
                                     first_frame_steps=first_frame_steps, guidance=guidance,
                                     first_frame_guidance=first_frame_guidance)
        self.num_frames = num_frames or cfg.num_frames
        if self.num_frames < 1:
            raise ValueError(f"num_frames: got {self.num_frames}, expected >= 1")

    def latent_shape(self) -> tuple[int, int, int]:
        """(t, h, w) of the latent of one clip."""
        tf, sf = self.codec.temporal_factor, self.codec.spatial_factor
        t = self.num_frames if tf == 1 else 1 + (self.num_frames - 1) // tf
        height, width = self.cfg.resolution
        return t, height // sf, width // sf

    @torch.no_grad()
    def __call__(self, prompt: str, seed: int) -> torch.Tensor:
        """One video (3, T, H, W) in [-1, 1] for ``prompt``, reproducible from ``seed``."""
        text, empty = self.wrapper.encode_text([prompt])
        t, h, w = self.latent_shape()
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = self.sampler(self.wrapper.model, text, empty, num_frames=t, latent_hw=(h, w),
                               channels=self.cfg.model.in_channels, generator=generator)
        return self.codec.decode(latents)[0].clamp(-1, 1).float().cpu()


def generate(checkpoint: str | os.PathLike, prompts: Sequence[str], num_samples: int = 1,
             out_dir: str | os.PathLike = "videos", *, seed: int = 0, rank: int | None = None,
             world_size: int | None = None, fps: float | None = None, progress: bool = True,
             **pipeline_options) -> list[Path]:
    """Write ``{prompt}-{i}.mp4`` for every prompt and ``i < num_samples`` into ``out_dir``.

    Returns the paths of this rank's share (videos already present included), in item order.
    ``rank``/``world_size`` default to torchrun's ``RANK``/``WORLD_SIZE`` (else 0/1).
    ``pipeline_options`` go to :class:`TextToVideo` (weights, device, steps, guidance, ...).
    """
    if isinstance(prompts, str):
        raise ValueError("prompts: got a string, expected a list of prompts")
    if num_samples < 1:
        raise ValueError(f"num_samples: got {num_samples}, expected >= 1")
    prompts = list(dict.fromkeys(prompts))  # a repeated prompt names the same files
    if not prompts:
        raise ValueError("prompts: got an empty list, expected at least one prompt")
    rank, world_size = _dist_env(rank, world_size)
    out_dir = Path(out_dir)
    items = [(p, i) for p in prompts for i in range(num_samples)]
    names = [video_filename(p, i) for p, i in items]
    if len(set(names)) != len(names):
        clash = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ValueError(f"prompts: different prompts map to the same file name {clash} (after "
                         "replacing '/' and cutting to 255 bytes); make them differ earlier")
    mine = [(item, out_dir / name) for item, name in zip(items, names, strict=True)]
    mine = mine[rank::world_size]
    paths = [path for _, path in mine]
    todo = [(item, path) for item, path in mine if not video_decodes(path)]
    if todo:
        pipeline = TextToVideo(checkpoint, **pipeline_options)
        fps = fps or pipeline.cfg.sample.fps
        out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(todo, desc=f"generate (rank {rank}/{world_size})" if world_size > 1
                   else "generate", unit="video", disable=not progress)
        for (prompt, i), path in bar:
            write_video(path, pipeline(prompt, sample_seed(seed, prompt, i)), fps=fps)
    if progress:
        print(f"videos: {out_dir} ({len(todo)} written, {len(paths) - len(todo)} already there)",
              flush=True)
    return paths


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line) or JSON (a list of strings, or of objects with
    ``prompt_en`` or ``prompt``, as in VBench's info files)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts: {path} is not a file")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise ValueError(f"--prompts: {path} must hold a JSON list")
        out = []
        for entry in data:
            text = entry if isinstance(entry, str) else (
                entry.get("prompt_en") or entry.get("prompt") if isinstance(entry, dict) else None)
            if not isinstance(text, str):
                raise ValueError(f"--prompts: {path}: entry {entry!r} is neither a string nor an "
                                 "object with 'prompt_en' or 'prompt'")
            out.append(text)
        return out
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m m4v.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--prompts", help="file: one prompt per line, or JSON")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=("ema", "model"))
    parser.add_argument("--steps", type=_int_list, help="Euler steps per stage, later frames")
    parser.add_argument("--first-frame-steps", type=_int_list)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--first-frame-guidance", type=float)
    parser.add_argument("--num-frames", type=int)
    parser.add_argument("--fps", type=float)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world-size", type=int)
    args = parser.parse_args(argv)
    prompts = args.prompt or read_prompts(args.prompts)
    return generate(
        args.checkpoint, prompts, args.num_samples, args.out, seed=args.seed, rank=args.rank,
        world_size=args.world_size, fps=args.fps, weights=args.weights, device=args.device,
        num_frames=args.num_frames, steps=args.steps, first_frame_steps=args.first_frame_steps,
        guidance=args.guidance, first_frame_guidance=args.first_frame_guidance,
    )


if __name__ == "__main__":
    main()
