"""Base of the pretrained (frozen) text encoders loaded from local transformers folders."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from m4v.text.local import WEIGHT_FILES, folder_fingerprint, require_folder

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json", "tokenizer_config.json")


class FrozenTextEncoder(nn.Module):
    """Holds a transformers ``model`` and ``tokenizer`` loaded from local folders, frozen.

    Frozen means: no parameter requires grad, forward runs under ``no_grad``, and ``train()`` keeps
    it in eval mode (a parent's ``model.train()`` must not switch on T5's dropout).
    ``identity`` names the encoder and a fingerprint of its files, for embedding caches.
    """

    def __init__(self, model: nn.Module, tokenizer, max_len: int, folders: tuple[Path, ...]):
        super().__init__()
        if max_len < 1:
            raise ValueError(f"max_len: got {max_len}, expected >= 1")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.identity = (
            f"{type(self).__name__}/{type(model).__name__}/max_len={max_len}/"
            f"{folder_fingerprint(*folders)}"
        )

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> ids (b, max_len) long, mask (b, max_len) bool; padded and truncated."""
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_len,
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        return batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()


def load_pretrained(
    model_cls,
    model_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None,
    what: str,
    dtype: torch.dtype | None,
):
    """(model, tokenizer, folders) from local folders; errors name the folder and expected files."""
    from transformers import AutoTokenizer

    model_dir = require_folder(
        model_dir, f"{what} model", {"config": ("config.json",), "weights": WEIGHT_FILES}
    )
    tokenizer_dir = require_folder(
        model_dir if tokenizer_dir is None else tokenizer_dir,
        f"{what} tokenizer",
        {"tokenizer": TOKENIZER_FILES},
    )
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = model_cls.from_pretrained(str(model_dir), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    folders = (model_dir,) if tokenizer_dir == model_dir else (model_dir, tokenizer_dir)
    return model, tokenizer, folders
