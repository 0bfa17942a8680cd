"""CLIP text model from a local transformers folder: the pooled text vector (and token features)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from m4v.text.embedding import TextEmbedding, check_prompts
from m4v.text.frozen import FrozenTextEncoder, load_pretrained


class CLIPTextEncoder(FrozenTextEncoder):
    """Frozen ``transformers.CLIPTextModel`` (or ``CLIPTextModelWithProjection``) + CLIPTokenizer.

    Pooled vector: ``projection=False`` gives the final-layer state of the end token
    (``pooler_output``, what FLUX and PyramidFlow condition on, 768 for CLIP-L);
    ``projection=True`` gives the projected ``text_embeds`` (the CLIP image-text space).
    ``projection=None`` (default) follows the folder: True iff config.json's ``architectures``
    lists CLIPTextModelWithProjection. Tokens: the final hidden states, zero at padding.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike | None = None,
        max_len: int = 77,
        projection: bool | None = None,
        dtype: torch.dtype | None = None,
    ):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        if projection is None:
            projection = _declares_projection(Path(model_dir) / "config.json")
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        model, tokenizer, folders = load_pretrained(
            cls, model_dir, tokenizer_dir, "CLIP text model", dtype
        )
        super().__init__(model, tokenizer, max_len, folders)
        self.projection = projection

    @property
    def text_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        cfg = self.model.config
        return cfg.projection_dim if self.projection else cfg.hidden_size

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbedding:
        """prompts -> tokens (b, max_len, hidden), mask (b, max_len), pooled (b, pooled_dim)."""
        check_prompts(prompts)
        ids, mask = self.tokenize(prompts)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        pooled = out.text_embeds if self.projection else out.pooler_output
        return TextEmbedding(out.last_hidden_state * mask[..., None], mask, pooled)


def _declares_projection(config_path: Path) -> bool:
    if not config_path.is_file():
        return False  # load_pretrained reports the missing folder/files
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    return "CLIPTextModelWithProjection" in architectures
