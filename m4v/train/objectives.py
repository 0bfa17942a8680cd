"""What a training stage optimises: one ``nn.Module`` whose ``forward`` returns the loss.

The trained module is the unit that DDP/FSDP2 wrap, the EMA follows and the checkpoint stores, so
everything trainable sits inside it and everything frozen (the latent codec, a pretrained text
encoder) stays outside: frozen weights are neither sharded, averaged nor copied into every
checkpoint. The loss is computed inside ``forward`` because FSDP2 gathers parameters in the root
module's forward hooks: calling submodules from outside would bypass them.

Every objective returns ``(loss, stats)``: a differentiable scalar and a dict of detached scalar
tensors for logging. A stat may be missing from a step (a pyramid stage that no sample of the
batch drew); :attr:`stat_names` lists all of them so that ranks can average over a fixed set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from m4v.flow import PyramidFlowLoss, TextFields

TextEncoderFn = Callable[[list[str]], object]


def split_last(embedding) -> tuple[TextFields, TextFields]:
    """A text embedding of ``b + 1`` prompts -> (the first b rows, the last row)."""
    t, m, p = embedding.tokens, embedding.mask, embedding.pooled
    return TextFields(t[:-1], m[:-1], p[:-1]), TextFields(t[-1:], m[-1:], p[-1:])


class FlowMatchingObjective(nn.Module):
    """Stage ``t2v``: pyramidal flow matching of M4V, optionally with a trained text encoder.

    Args:
        model: the M4V network.
        loss: the pyramidal flow-matching loss (None for inference: generation only encodes text
            and calls ``model``).
        text_encoder: a trainable text encoder (a registered submodule: trained, checkpointed).
        frozen_text_encoder: a pretrained encoder run under ``no_grad`` (not registered).
            Exactly one of the two encoders is given.
        image_fraction: probability that a step trains on the first latent frame of its clips
            alone, as images (joint image-video training, as PyramidFlow does). Why: the first
            frame is the only one generated from the text alone (later frames can copy colours
            and shapes from their history), yet with uniform frame sampling it is only 1/T of
            the video objective, so the text conditioning would be learned T times slower.
            The draw uses the global RNG (re-seeded per step by the trainer), one per step, so
            every rank makes the same number of model calls either way.
    """

    def __init__(self, model: nn.Module, loss: PyramidFlowLoss | None, *,
                 text_encoder: nn.Module | None = None,
                 frozen_text_encoder: TextEncoderFn | None = None, image_fraction: float = 0.0):
        super().__init__()
        if (text_encoder is None) == (frozen_text_encoder is None):
            raise ValueError("text_encoder / frozen_text_encoder: expected exactly one of them")
        self.model = model
        self.text_encoder = text_encoder
        self._frozen = [frozen_text_encoder]  # a list: kept out of the module tree on purpose
        self.loss = loss
        if not 0 <= image_fraction <= 1:
            raise ValueError(f"image_fraction: got {image_fraction}, expected in [0, 1]")
        self.image_fraction = image_fraction
        stages = loss.schedule.stages if loss is not None else 0
        self.stat_names = ["loss", *(f"loss_stage{s}" for s in range(stages))]

    def encode_text(self, captions: list[str]) -> tuple[TextFields, TextFields]:
        """(text of the captions, the empty-prompt embedding used for text dropout)."""
        prompts = list(captions) + [""]
        if self.text_encoder is not None:
            return split_last(self.text_encoder(prompts))
        with torch.no_grad():
            return split_last(self._frozen[0](prompts))

    def forward(self, latents: torch.Tensor, captions: list[str]):
        """latents (b, C, T, h, w) clean; captions b strings -> (loss, stats)."""
        if self.loss is None:
            raise RuntimeError("FlowMatchingObjective was built without a loss (inference only)")
        if self.image_fraction and float(torch.rand(())) < self.image_fraction:
            latents = latents[:, :, :1]
        text, empty = self.encode_text(captions)
        out = self.loss(self.model, latents, text, empty)
        stats = {"loss": out.loss.detach()}
        for stage, value in out.stage_losses().items():
            stats[f"loss_stage{stage}"] = value
        return out.loss, stats


class VAEObjective(nn.Module):
    """Stage ``vae``: the causal 3D VAE's reconstruction + KL loss (:func:`m4v.vae.vae_loss`)."""

    stat_names = ["loss", "l1", "kl", "mse", "psnr"]

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, video: torch.Tensor):
        from m4v.vae import vae_loss

        loss, logs = vae_loss(self.vae, video)
        return loss, {k: torch.tensor(float(v)) for k, v in logs.items()}
