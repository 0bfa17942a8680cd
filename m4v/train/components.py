"""Building the parts of a run from its :class:`~m4v.train.config.TrainConfig`.

Training and generation both go through these functions, so a checkpoint's ``config.json`` is
enough to rebuild the exact modules whose weights it holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from m4v.flow import PyramidFlowLoss, PyramidSampler, PyramidSchedule
from m4v.train.config import TrainConfig
from m4v.train.objectives import FlowMatchingObjective, VAEObjective


def build_codec(cfg: TrainConfig) -> nn.Module:
    """The frozen latent codec (in eval mode, no gradients)."""
    from m4v.vae import load_codec

    codec = load_codec(cfg.codec)
    if cfg.model.in_channels != codec.latent_channels:
        raise ValueError(
            f"model.in_channels: got {cfg.model.in_channels}, expected {codec.latent_channels} "
            f"(the latent channels of codec {cfg.codec!r}); set model.in_channels to match"
        )
    return codec.eval().requires_grad_(False)


def text_encoder_trainable(cfg: TrainConfig) -> bool:
    return cfg.text.kind == "builtin"


def build_text_encoder(cfg: TrainConfig) -> nn.Module:
    """The text encoder named by ``cfg.text``; its widths must be the model's text/pooled dims."""
    from m4v.text import BuiltinTextEncoder, CachedTextEncoder, PretrainedTextEncoder

    t, m = cfg.text, cfg.model
    if t.kind == "builtin":
        return BuiltinTextEncoder(width=m.text_dim, max_len=m.max_text_len,
                                  pooled_dim=m.pooled_dim, layers=t.builtin_layers,
                                  heads=t.builtin_heads)
    for name in ("t5_path", "clip_path"):
        if not getattr(t, name):
            raise ValueError(f"text.{name}: got nothing, expected a local folder with the "
                             f"pretrained weights (set it with --set text.{name}=...)")
    encoder = PretrainedTextEncoder(
        t.t5_path, t.clip_path, max_len=m.max_text_len, t5_tokenizer_dir=t.t5_tokenizer_path,
        clip_tokenizer_dir=t.clip_tokenizer_path, dtype=getattr(torch, t.dtype))
    if (encoder.text_dim, encoder.pooled_dim) != (m.text_dim, m.pooled_dim):
        raise ValueError(
            f"model.text_dim / model.pooled_dim: got {m.text_dim} / {m.pooled_dim}, expected "
            f"{encoder.text_dim} / {encoder.pooled_dim} (the widths of the text encoders in "
            f"{t.t5_path} and {t.clip_path}); set the model's dims to match"
        )
    return CachedTextEncoder(encoder, t.cache) if t.cache else encoder


def build_model(cfg: TrainConfig) -> nn.Module:
    from m4v.model import M4V

    return M4V(cfg.model)


def build_schedule(cfg: TrainConfig) -> PyramidSchedule:
    return PyramidSchedule(stages=cfg.model.pyramid_stages, gamma=cfg.flow.gamma)


def build_sampler(cfg: TrainConfig, progress: bool = False, **changes) -> PyramidSampler:
    """The sampler with the run's sample settings; ``changes`` override them (e.g. ``steps``)."""
    s = cfg.sample
    options = dict(first_frame_guidance=s.first_frame_guidance,
                   first_frame_steps=s.first_frame_steps, guidance=s.guidance, steps=s.steps)
    options.update({k: v for k, v in changes.items() if v is not None})
    return PyramidSampler(build_schedule(cfg), patch_size=cfg.model.patch_size,
                          progress=progress, **options)


def build_dataset(cfg: TrainConfig) -> Dataset:
    """The training clips: (3, T, H, W) in [-1, 1] + caption, T/H/W from the config."""
    d = cfg.data
    if d.kind == "shapes":
        from m4v.data.shapes import ShapesWorld

        return ShapesWorld(seed=d.seed, num_frames=cfg.num_frames, size=tuple(cfg.resolution))
    if not d.path:
        raise ValueError(f"data.path: got nothing, expected the location of the {d.kind} data "
                         "(set it with --set data.path=...)")
    from m4v.data import VideoFolderDataset, WebVideoDataset

    size = tuple(cfg.resolution)
    if d.kind == "folder":
        if not os.path.isdir(d.path):
            raise ValueError(f"data.path: {d.path!r} is not a folder; data.kind=folder expects a "
                             "folder of videos with captions.jsonl or captions.csv")
        return VideoFolderDataset(d.path, index=d.index, num_frames=cfg.num_frames, size=size,
                                  stride=d.stride)
    return WebVideoDataset(d.path, num_frames=cfg.num_frames, size=size, stride=d.stride,
                           shuffle_shards=True, seed=cfg.seed)


@dataclass
class Task:
    """A stage's trained module, how a data batch becomes its inputs, and its data."""

    module: nn.Module
    prepare: Callable[[dict, torch.device], dict]  # frozen, no-grad work: batch -> forward kwargs
    dataset: Dataset
    frozen: list[nn.Module]  # modules to move to the device but not to train


def build_task(cfg: TrainConfig) -> Task:
    """The trained module and data of ``cfg.stage`` (on the CPU; the trainer moves them)."""
    dataset = build_dataset(cfg)
    if cfg.stage == "vae":
        from m4v.vae import CausalVAE3D

        return Task(VAEObjective(CausalVAE3D(cfg.vae)),
                    lambda batch, device: {"video": batch["video"].to(device)}, dataset, [])
    codec = build_codec(cfg)
    loss = PyramidFlowLoss(build_schedule(cfg), stage_ratios=cfg.flow.stage_ratios,
                           text_dropout=cfg.flow.text_dropout, history_noise=cfg.flow.history_noise,
                           frame_sampling=cfg.flow.frame_sampling, patch_size=cfg.model.patch_size)
    encoder = build_text_encoder(cfg)
    frozen = [codec]
    image_fraction = cfg.flow.image_fraction
    if text_encoder_trainable(cfg):
        module = FlowMatchingObjective(build_model(cfg), loss, text_encoder=encoder,
                                       image_fraction=image_fraction)
    else:
        module = FlowMatchingObjective(build_model(cfg), loss, frozen_text_encoder=encoder,
                                       image_fraction=image_fraction)
        frozen.append(encoder)

    @torch.no_grad()
    def prepare(batch: dict, device: torch.device) -> dict:
        return {"latents": codec.encode(batch["video"].to(device)), "captions": batch["caption"]}

    return Task(module, prepare, dataset, frozen)


def sample_prompts(cfg: TrainConfig) -> list[str]:
    """Prompts of the end-of-run samples: ``sample.num_prompts`` captions of held-out Shapes
    clips (world seed ``sample.prompt_seed``), or of the first training clips for other data."""
    n = cfg.sample.num_prompts
    if cfg.data.kind == "shapes":
        from m4v.data.shapes import ShapesWorld, caption_for

        world = ShapesWorld(seed=cfg.sample.prompt_seed, num_frames=cfg.num_frames,
                            size=tuple(cfg.resolution))
        return [caption_for(world.attributes(i)) for i in range(n)]
    dataset = build_dataset(cfg)
    return [dataset[i]["caption"] for i in range(min(n, len(dataset)))]

