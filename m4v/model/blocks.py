"""The two block types of M4V's two-stage hybrid backbone.

* :class:`MMDiTBlock`, the introducer: dual-stream (separate text and video weights), joint
  block-causal attention over ``[text, video]``, adaLN-Zero.
* :class:`MMDiMBlock`, the core: single-stream (text and video share weights). Its mixer is the
  Mamba SSM over the re-composed sequence ``[T, R, F_1, ..., R, F_n, T]`` or, for the attention
  alternative, joint block-causal attention; an optional temporal branch runs beside the mixer;
  then an optional MLP.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from m4v.config import M4VConfig
from m4v.model.embeddings import ClipLayout
from m4v.model.layers import QKV, AdaLN, Mlp, rotate_video
from m4v.model.mamba import MambaMixer
from m4v.model.recomposition import SequenceSpec, joint_to_sequence, sequence_to_joint
from m4v.model.temporal import TemporalBranch
from m4v.ops.attention import block_causal_attention
from m4v.ops.modulation import gated_residual, layer_norm_modulate

NUM_DIRECTIONS = 8


def split_text_video(x: Tensor, text_len: int) -> tuple[Tensor, Tensor]:
    """The text and video parts (views) of a joint (b, Lt + Lv, ...) stream. ``split`` rather
    than two slices: a slice's backward fills a zero tensor of the whole stream and copies its
    part in, and the stream's gradient then adds the two; split's backward is one concatenation."""
    return x.split([text_len, x.shape[1] - text_len], dim=1)


def joint_attention(qkv: tuple[Tensor, Tensor, Tensor], layout: ClipLayout, rope, text_mask):
    """Block-causal attention with RoPE on the video tokens: -> (b, Lt + Lv, d)."""
    q, k, v = qkv
    cos, sin = rope
    q = rotate_video(q, layout.text_len, cos, sin)
    k = rotate_video(k, layout.text_len, cos, sin)
    out = block_causal_attention(q, k, v, layout.text_len, layout.frame_lens, text_mask)
    return out.transpose(1, 2).flatten(2)


class _Stream(nn.Module):
    """One stream's weights inside a dual-stream MM-DiT block."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.mod = AdaLN(hidden, 6)
        self.qkv = QKV(hidden, heads)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = Mlp(hidden, mlp_ratio)


class MMDiTBlock(nn.Module):
    def __init__(self, cfg: M4VConfig):
        super().__init__()
        self.text = _Stream(cfg.hidden_size, cfg.num_heads, 4.0)
        self.video = _Stream(cfg.hidden_size, cfg.num_heads, 4.0)

    def forward(self, text: Tensor, video: Tensor, c: Tensor, layout: ClipLayout, rope,
                text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """text (b, Lt, d), video (b, Lv, d), c (b, d) -> updated (text, video)."""
        mods = []
        qkvs = []
        for s, x in ((self.text, text), (self.video, video)):
            m = s.mod(c)  # shift, scale, gate (attention); shift, scale, gate (MLP)
            mods.append(m)
            qkvs.append(s.qkv(layer_norm_modulate(x, m[0], m[1])))
        qkv = tuple(torch.cat([a, b], dim=2) for a, b in zip(*qkvs, strict=True))
        attn = joint_attention(qkv, layout, rope, text_mask)
        out = []
        for s, x, m, a in zip((self.text, self.video), (text, video), mods,
                              split_text_video(attn, layout.text_len), strict=True):
            x = gated_residual(x, m[2], s.proj(a))
            x = gated_residual(x, m[5], s.mlp(layer_norm_modulate(x, m[3], m[4])))
            out.append(x)
        return out[0], out[1]


class MMDiMBlock(nn.Module):
    """Single-stream core block; ``layer_idx`` picks the zigzag direction (``layer_idx mod 8``)."""

    def __init__(self, cfg: M4VConfig, layer_idx: int):
        super().__init__()
        d = cfg.hidden_size
        self.cfg = cfg
        self.direction = layer_idx % NUM_DIRECTIONS if cfg.mm_recomposition else None
        if cfg.mixer == "mamba":
            self.mixer = MambaMixer(d, cfg.d_state, cfg.expand, cfg.d_conv, cfg.dt_rank,
                                    cfg.scan_backend)
            self.register = nn.Parameter(torch.randn(d) * 0.02) if cfg.registers else None
        else:
            self.qkv = QKV(d, cfg.num_heads)
            self.proj = nn.Linear(d, d)
        self.temporal = (TemporalBranch(d, cfg.temporal_dim, cfg.temporal_heads)
                         if cfg.temporal_branch else None)
        self.mlp = Mlp(d, cfg.mlp_ratio) if cfg.mlp_ratio > 0 else None
        # shift, scale, gate for the mixer [+ gate of the temporal branch]
        # [+ shift, scale, gate of the MLP]
        self.mod = AdaLN(d, 3 + (self.temporal is not None) + 3 * (self.mlp is not None))

    def sequence_spec(self, layout: ClipLayout) -> SequenceSpec:
        return SequenceSpec(layout.frame_sizes, self.direction, self.cfg.registers,
                            self.cfg.text_recomposition)

    def mix(self, x: Tensor, layout: ClipLayout, rope, text_mask: Tensor) -> Tensor:
        """The token mixer over the joint stream: x (b, Lt + Lv, d) -> (b, Lt + Lv, d)."""
        if self.cfg.mixer == "attention":
            return self.proj(joint_attention(self.qkv(x), layout, rope, text_mask))
        spec = self.sequence_spec(layout)
        return sequence_to_joint(
            self.mixer(joint_to_sequence(x, text_mask, self.register, spec)), text_mask, spec)

    def forward(self, text: Tensor, video: Tensor, c: Tensor, layout: ClipLayout, rope,
                text_mask: Tensor) -> tuple[Tensor, Tensor]:
        # One stream inside the block: the one concatenation (and, backwards, the split's) is
        # that of its inputs; every residual updates the joint stream in place of two halves.
        lt = layout.text_len
        mods = iter(self.mod(c))
        shift, scale, gate = next(mods), next(mods), next(mods)
        x = torch.cat([text, video], dim=1)
        h = layer_norm_modulate(x, shift, scale)
        x = gated_residual(x, gate, self.mix(h, layout, rope, text_mask))
        if self.temporal is not None:  # updates the video rows only
            x = gated_residual(x, next(mods), self.temporal(h, layout), start=lt)
        if self.mlp is not None:
            shift, scale, gate = next(mods), next(mods), next(mods)
            x = gated_residual(x, gate, self.mlp(layer_norm_modulate(x, shift, scale)))
        return split_text_video(x, lt)
