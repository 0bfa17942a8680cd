"""T5 tokens + CLIP pooled vector: the text conditioning of real runs (the FLUX/PyramidFlow
convention, text_dim 4096 and pooled_dim 768 with T5-XXL and CLIP-L)."""

from __future__ import annotations

import os

import torch
from torch import nn

from m4v.text.clip import CLIPTextEncoder
from m4v.text.embedding import TextEmbedding
from m4v.text.t5 import T5TextEncoder


class PretrainedTextEncoder(nn.Module):
    """Frozen pair: ``tokens``/``mask`` from T5 (``max_len`` tokens), ``pooled`` from CLIP.

    Folders are local transformers folders (see T5TextEncoder / CLIPTextEncoder); for a diffusers
    FLUX-style pipeline: t5_dir=text_encoder_2, t5_tokenizer_dir=tokenizer_2,
    clip_dir=text_encoder, clip_tokenizer_dir=tokenizer.
    """

    def __init__(
        self,
        t5_dir: str | os.PathLike,
        clip_dir: str | os.PathLike,
        max_len: int = 128,
        t5_tokenizer_dir: str | os.PathLike | None = None,
        clip_tokenizer_dir: str | os.PathLike | None = None,
        clip_projection: bool | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.t5 = T5TextEncoder(t5_dir, t5_tokenizer_dir, max_len=max_len, dtype=dtype)
        self.clip = CLIPTextEncoder(
            clip_dir, clip_tokenizer_dir, projection=clip_projection, dtype=dtype
        )
        self.identity = f"{type(self).__name__}[{self.t5.identity}|{self.clip.identity}]"

    @property
    def text_dim(self) -> int:
        return self.t5.text_dim

    @property
    def pooled_dim(self) -> int:
        return self.clip.pooled_dim

    @property
    def max_len(self) -> int:
        return self.t5.max_len

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        return super().train(False)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        """prompts -> tokens (b, max_len, text_dim), mask (b, max_len), pooled (b, pooled_dim)."""
        t5 = self.t5(prompts)
        pooled = self.clip(prompts).pooled.to(device=t5.tokens.device, dtype=t5.tokens.dtype)
        return TextEmbedding(t5.tokens, t5.mask, pooled)
