"""The small built-in text encoder of the embedded default: trains together with the model.

Tokenizer: open_clip's ``SimpleTokenizer``, the CLIP byte-level BPE whose vocabulary
(``bpe_simple_vocab_16e6.txt.gz``) ships inside the open_clip package, so nothing is downloaded.
Each prompt becomes ``[<start>, bpe..., <end>]``, padded to ``max_len``. Prompts longer than
``max_len - 2`` BPE tokens are truncated (the end token is kept), or rejected with a ValueError
when ``strict=True``. The empty prompt gives ``[<start>, <end>]`` (the CFG negative / dropped text).

Encoder: token + learned position embeddings, a pre-norm bidirectional transformer with a
key-padding mask, a final LayerNorm. The pooled vector is a projection of the end token's state
(CLIP's convention: with bidirectional attention it has seen the whole prompt).
"""

from __future__ import annotations

import torch
from torch import nn

from m4v.text.embedding import TextEmbedding, check_prompts


class BuiltinTextEncoder(nn.Module):
    def __init__(
        self,
        width: int = 64,
        max_len: int = 16,
        pooled_dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        strict: bool = False,
    ):
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        if max_len < 2:
            raise ValueError(f"max_len: got {max_len}, expected >= 2 (start and end tokens)")
        if width % heads:
            raise ValueError(f"width: got {width}, expected a multiple of heads={heads}")
        for name, value in (("pooled_dim", pooled_dim), ("layers", layers), ("heads", heads)):
            if value < 1:
                raise ValueError(f"{name}: got {value}, expected >= 1")
        self.tokenizer = SimpleTokenizer()
        self.width, self.max_len, self.pooled_dim, self.strict = width, max_len, pooled_dim, strict
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(max_len, width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            int(width * mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # The nested-tensor fast path would change padded outputs between train and eval.
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.pool = nn.Linear(width, pooled_dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    @property
    def text_dim(self) -> int:
        return self.width

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> ids (b, max_len) long, mask (b, max_len) bool, on this module's device."""
        check_prompts(prompts)
        tok = self.tokenizer
        sot, eot = tok.encoder["<start_of_text>"], tok.encoder["<end_of_text>"]
        ids = torch.zeros(len(prompts), self.max_len, dtype=torch.long)
        lengths = []
        for i, prompt in enumerate(prompts):
            bpe = tok.encode(prompt)
            if len(bpe) > self.max_len - 2:
                if self.strict:
                    raise ValueError(
                        f"prompts[{i}]: {len(bpe)} tokens, expected at most {self.max_len - 2} "
                        f"(max_len={self.max_len} minus start/end) with strict=True: {prompt!r}"
                    )
                bpe = bpe[: self.max_len - 2]
            row = [sot, *bpe, eot]
            ids[i, : len(row)] = torch.tensor(row)
            lengths.append(len(row))
        mask = torch.arange(self.max_len)[None] < torch.tensor(lengths)[:, None]
        device = self.position_embedding.device
        return ids.to(device), mask.to(device)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        """b prompts -> tokens (b, max_len, width), mask (b, max_len), pooled (b, pooled_dim)."""
        ids, mask = self.tokenize(prompts)
        x = self.token_embedding(ids) + self.position_embedding
        x = self.norm(self.transformer(x, src_key_padding_mask=~mask))
        x = x * mask[..., None]
        end = mask.sum(dim=1) - 1  # position of the end token
        pooled = self.pool(x[torch.arange(len(prompts), device=x.device), end])
        return TextEmbedding(x, mask, pooled)
