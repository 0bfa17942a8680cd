"""On-disk cache of text embeddings of a frozen encoder, so that captions are encoded once.

Key: sha256 of (encoder identity, prompt); the identity includes a fingerprint of the encoder's
files, so new weights never hit stale entries. One safetensors file per prompt
(``<dir>/<key[:2]>/<key>.safetensors``: tokens (Lt, d), mask (Lt,), pooled (d,) if any, with the
encoder identity and prompt in its metadata, checked on read), written atomically (temporary file
+ rename), so concurrent writers and crashes never leave a partial entry.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from m4v.text.embedding import TextEmbedding, check_prompts


class EmbeddingCache:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def path(self, encoder_id: str, prompt: str) -> Path:
        key = hashlib.sha256(f"{encoder_id}\0{prompt}".encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, encoder_id: str, prompt: str) -> dict[str, torch.Tensor] | None:
        """The cached tensors of one prompt (tokens (Lt, d), mask (Lt,), [pooled (d,)]), or None."""
        from safetensors import safe_open

        path = self.path(encoder_id, prompt)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("encoder") != encoder_id or meta.get("prompt") != prompt:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}

    def store(self, encoder_id: str, prompt: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self.path(encoder_id, prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                str(tmp),
                metadata={"encoder": encoder_id, "prompt": prompt},
            )
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def encode(self, encoder: nn.Module, prompts: list[str]) -> TextEmbedding:
        """``encoder(prompts)`` through the cache: encodes only the prompts not cached yet (once
        each, in one batch), stores them, and returns all on the encoder's device."""
        check_prompts(prompts)
        encoder_id = _identity(encoder)
        found = {p: self.load(encoder_id, p) for p in dict.fromkeys(prompts)}
        missing = [p for p, t in found.items() if t is None]
        self.misses += len(missing)  # prompts encoded
        self.hits += len(prompts) - len(missing)  # prompts served without encoding
        if missing:
            fresh = encoder(missing)
            for i, p in enumerate(missing):
                found[p] = {"tokens": fresh.tokens[i], "mask": fresh.mask[i]}
                if fresh.pooled is not None:
                    found[p]["pooled"] = fresh.pooled[i]
                self.store(encoder_id, p, found[p])
        device = _device(encoder)
        rows = [found[p] for p in prompts]
        pooled = None
        if all("pooled" in r for r in rows):
            pooled = torch.stack([r["pooled"].to(device) for r in rows])
        return TextEmbedding(
            torch.stack([r["tokens"].to(device) for r in rows]),
            torch.stack([r["mask"].to(device) for r in rows]),
            pooled,
        )


class CachedTextEncoder(nn.Module):
    """A frozen text encoder behind an ``EmbeddingCache``; same call interface as the encoder.

    Refuses trainable encoders (the built-in one trains with the model: its cache would go stale).
    """

    def __init__(self, encoder: nn.Module, cache: EmbeddingCache | str | os.PathLike):
        super().__init__()
        trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"encoder: {type(encoder).__name__} has trainable parameters "
                f"(e.g. {trainable[0]}); "
                "only frozen encoders can be cached"
            )
        _identity(encoder)
        self.encoder = encoder
        self.cache = cache if isinstance(cache, EmbeddingCache) else EmbeddingCache(cache)

    def __getattr__(self, name: str):
        # text_dim, pooled_dim, max_len, identity... come from the wrapped encoder.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["encoder"], name)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        return self.cache.encode(self.encoder, prompts)


def _identity(encoder: nn.Module) -> str:
    identity = getattr(encoder, "identity", None)
    if not isinstance(identity, str) or not identity:
        raise ValueError(
            f"encoder: {type(encoder).__name__} has no string `identity` naming its weights; "
            "the cache key needs one"
        )
    return identity


def _device(encoder: nn.Module) -> torch.device:
    param = next(encoder.parameters(), None)
    return torch.device("cpu") if param is None else param.device
