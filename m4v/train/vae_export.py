"""Turning a ``--stage vae`` checkpoint into a codec folder the diffusion stage can load.

The EMA weights are loaded into a plain :class:`m4v.vae.CausalVAE3D`, its latent scale and shift
are calibrated on training clips (so the diffusion model sees zero-mean, unit-variance latents),
and it is written with ``save_pretrained``: ``--set codec=causal3d:RUN_DIR/vae`` then uses it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from m4v.train.batches import collate
from m4v.train.checkpoint import load_weights, read_checkpoint_info
from m4v.train.objectives import VAEObjective


def export_vae(checkpoint: Path, folder: Path, dataset: Dataset, device: torch.device,
               calibration_clips: int = 64, batch_size: int = 4) -> Path:
    from m4v.vae import CausalVAE3D

    cfg = read_checkpoint_info(checkpoint).config
    if cfg.stage != "vae":
        raise ValueError(f"checkpoint: {checkpoint} is a {cfg.stage!r} run, expected a 'vae' run")
    wrapper = VAEObjective(CausalVAE3D(cfg.vae))
    load_weights(checkpoint, wrapper, cfg.sample.weights)
    vae = wrapper.vae.to(device).eval()
    count = min(calibration_clips, len(dataset))

    def batches():
        for start in range(0, count, batch_size):
            items = [dataset[i] for i in range(start, min(count, start + batch_size))]
            yield collate(items)["video"].to(device)

    vae.calibrate_latent_scaling(batches())
    return vae.cpu().save_pretrained(folder)
