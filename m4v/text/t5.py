"""T5 encoder (e.g. T5-XXL, 4096 wide) from a local transformers folder: per-token features."""

from __future__ import annotations

import os

import torch

from m4v.text.embedding import TextEmbedding, check_prompts
from m4v.text.frozen import FrozenTextEncoder, load_pretrained


class T5TextEncoder(FrozenTextEncoder):
    """Frozen ``transformers.T5EncoderModel`` + its tokenizer.

    ``model_dir``: config.json + weights; ``tokenizer_dir`` (default: the same folder):
    tokenizer.json or spiece.model (+ tokenizer_config.json). Prompts are padded/truncated to
    ``max_len`` (128, as PyramidFlow/FLUX). T5 has no pooled vector: ``pooled`` is None (the
    pooled vector comes from CLIP, see ``PretrainedTextEncoder``).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike | None = None,
        max_len: int = 128,
        dtype: torch.dtype | None = None,
    ):
        from transformers import T5EncoderModel

        model, tokenizer, folders = load_pretrained(
            T5EncoderModel, model_dir, tokenizer_dir, "T5 text encoder", dtype
        )
        super().__init__(model, tokenizer, max_len, folders)

    @property
    def text_dim(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        """prompts -> tokens (b, max_len, d_model), 0 at padding; mask (b, max_len); no pooled."""
        check_prompts(prompts)
        ids, mask = self.tokenize(prompts)
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return TextEmbedding(tokens * mask[..., None], mask, None)
