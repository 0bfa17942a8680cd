"""FLOP counts of one M4V forward: three engines, one convention, one breakdown.

Convention (shared by every engine, checked against each other in ``tests/test_profile.py``):

* counted: the matrix-class ops (linear layers, ``matmul``, the depthwise ``conv1d``, the two
  products of every attention, QK^T and AV) and the selective scan's recurrence;
* not counted: elementwise work (norms, activations, adaLN modulation, gates, RoPE, softmax,
  pooling/upsampling, token gathers); at M4V's widths it is a few percent of the total;
* attention is counted over every (query, key) pair it is given: the block-causal mask of the
  joint attention is honoured because the model runs one SDPA per query group over the key prefix
  it may see, while an explicit mask (the temporal branch) is not exploited;
* the depthwise conv is counted over the ``L + k - 1`` outputs it computes before the causal crop;
* units: **FLOPs** count a multiply and an add as two (a matmul of m x k by k x n is 2mkn);
  **MACs** are fvcore's unit, a multiply-add counted once (mkn). For the matrix-class ops
  FLOPs = 2 MACs exactly; the scan's recurrence is counted op by op by
  :func:`m4v.ops.scan.selective_scan_flops` (7 b d l n + per-step terms as FLOPs; with
  ``multiply_add_as_one`` 5 b d l n + ... as MACs), so its two figures are not in ratio 2.

Engines:

* ``"fvcore"``: ``fvcore.nn.FlopCountAnalysis`` (TorchScript trace, MACs) on real CPU tensors of
  the whole model, with handles for ``aten::scaled_dot_product_attention`` and
  ``m4v::selective_scan`` and fvcore's elementwise handles (norms, pooling, upsampling) set to 0
  for the convention. TorchScript tracing of meta tensors fails inside the meta kernel of
  ``conv1d`` (its shape checks see traced sizes), so fvcore needs real activations: it is the
  engine for configurations that fit in memory, and the cross-check of the other two.
* ``"flop_counter"``: ``torch.utils.flop_counter.FlopCounterMode`` (dispatch level, FLOPs) on
  meta tensors: nothing is allocated, so paper-scale clips count on a laptop. It counts one block
  of each kind and the embeddings/final layer (a copy of the model with no blocks) and multiplies
  (blocks of a kind differ only in their zigzag direction, a permutation that costs no FLOPs; the
  tests check the product against a whole-model count).
* ``"analytic"``: closed-form count from the config and the token layout (:func:`analytic_count`).

Breakdown categories: ``introducer`` (all MM-DiT blocks), ``mixer`` (the MM-DiM token mixer:
Mamba in_proj, conv1d, x_proj, dt_proj, scan, out_proj, or for the attention alternative its QKV,
attention and output projection), ``temporal`` (temporal branches), ``mlp`` (MM-DiM MLPs),
``modulation`` (the MM-DiM blocks' adaLN linears) and ``other`` (patch/text/timestep/pooled
embedders and the final layer). An MM-DiM block is mixer + temporal + mlp + modulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from m4v.config import M4VConfig
from m4v.model import M4V
from m4v.model.blocks import MMDiMBlock, MMDiTBlock
from m4v.model.embeddings import ClipLayout
from m4v.model.rope import rope_cos_sin
from m4v.ops.scan import selective_scan_flops

CATEGORIES = ("introducer", "mixer", "temporal", "mlp", "modulation", "other")
ENGINES = ("fvcore", "flop_counter", "analytic")
TIMESTEP_FREQ_DIM = 256  # m4v.model.embeddings.TimestepEmbedder's sinusoid width
INTRODUCER_MLP_RATIO = 4.0  # MM-DiT blocks keep ratio 4 whatever cfg.mlp_ratio says
_SCAN_OP = "selective_scan"
_ZERO_FVCORE_OPS = ("aten::layer_norm", "aten::group_norm", "aten::batch_norm",
                    "aten::instance_norm", "aten::upsample_nearest2d", "aten::upsample_bilinear2d",
                    "aten::adaptive_avg_pool2d", "aten::grid_sampler")


@dataclass
class Tally:
    """FLOPs and MACs per category (:data:`CATEGORIES`)."""

    flops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    macs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    def add(self, category: str, flops: int, macs: int) -> None:
        self.flops[category] += int(flops)
        self.macs[category] += int(macs)

    def __add__(self, other: Tally) -> Tally:
        return Tally({k: self.flops[k] + other.flops[k] for k in CATEGORIES},
                     {k: self.macs[k] + other.macs[k] for k in CATEGORIES})

    def __mul__(self, k: int) -> Tally:
        return Tally({c: v * k for c, v in self.flops.items()},
                     {c: v * k for c, v in self.macs.items()})

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())


# ----------------------------------------------------------------------------- analytic


def attention_macs(query_key_pairs: int, width: int) -> int:
    """QK^T and AV over ``query_key_pairs`` pairs, all heads together (heads x head_dim = width)."""
    return 2 * query_key_pairs * width


def block_causal_pairs(text_len: int, frame_lens: list[int]) -> int:
    """(query, key) pairs of the joint attention: text sees text, frame i text + frames <= i."""
    pairs, keys = text_len * text_len, text_len
    for n in frame_lens:
        keys += n
        pairs += n * keys
    return pairs


def scan_length(cfg: M4VConfig, layout: ClipLayout) -> int:
    """Length of the re-composed MM-DiM sequence S."""
    text = layout.text_len * (2 if cfg.text_recomposition else 1)
    return text + layout.video_len + (len(layout.frame_sizes) if cfg.registers else 0)


def temporal_tokens(layout: ClipLayout) -> tuple[int, int]:
    """(frame-level tokens, grid cells per token) of the temporal branch (times temporal_dim)."""
    hs = min(h for h, _ in layout.frame_sizes)
    ws = min(w for _, w in layout.frame_sizes)
    k = layout.frame_sizes[-1][0] // hs
    return len(layout.frame_sizes) - 1 + k * k, hs * ws


def analytic_count(cfg: M4VConfig, layout: ClipLayout, batch: int = 1) -> Tally:
    """Closed-form count of one forward, from the config and the token layout alone."""
    d, di = cfg.hidden_size, cfg.d_inner
    lt, lv = layout.text_len, layout.video_len
    joint = lt + lv
    tally = Tally()
    # embeddings and final layer
    other = (lv * cfg.patch_dim * d + lt * cfg.text_dim * d
             + TIMESTEP_FREQ_DIM * d + d * d + cfg.pooled_dim * d + d * d
             + d * 2 * d + layout.frame_lens[-1] * d * cfg.patch_dim)
    tally.add("other", 2 * other, other)
    attn = attention_macs(block_causal_pairs(lt, layout.frame_lens), d)
    # MM-DiT: adaLN (6 chunks) per stream, QKV, joint attention, output projection, MLP
    mlp_in = int(d * INTRODUCER_MLP_RATIO)
    intro = 2 * d * 6 * d + joint * d * 3 * d + attn + joint * d * d + joint * 2 * d * mlp_in
    tally.add("introducer", 2 * intro * cfg.num_introducer_layers,
              intro * cfg.num_introducer_layers)
    # MM-DiM
    core = Tally()
    chunks = 3 + int(cfg.temporal_branch) + 3 * int(cfg.mlp_ratio > 0)
    core.add("modulation", 2 * d * chunks * d, d * chunks * d)
    if cfg.mixer == "mamba":
        length = scan_length(cfg, layout)
        r, n = cfg.dt_rank_value, cfg.d_state
        mixer = (length * d * 2 * di  # in_proj
                 + di * (length + cfg.d_conv - 1) * cfg.d_conv  # depthwise conv1d
                 + length * di * (r + 2 * n) + length * r * di  # x_proj, dt_proj
                 + length * di * d)  # out_proj
        flags = dict(with_D=True, with_z=True, with_delta_bias=True, delta_softplus=True)
        core.add("mixer", 2 * mixer + selective_scan_flops(1, di, length, n, **flags),
                 mixer + selective_scan_flops(1, di, length, n, **flags, multiply_add_as_one=True))
    else:
        mixer = joint * d * 3 * d + attn + joint * d * d
        core.add("mixer", 2 * mixer, mixer)
    if cfg.temporal_branch:
        c = cfg.temporal_dim
        tokens, cells = temporal_tokens(layout)
        # q, k, v are projected on the whole joint stream, the text rows then dropped (see
        # TemporalBranch.forward)
        temporal = joint * d * 3 * c + attention_macs(tokens * tokens, c * cells) + lv * c * d
        core.add("temporal", 2 * temporal, temporal)
    if cfg.mlp_ratio > 0:
        mlp = joint * 2 * d * int(d * cfg.mlp_ratio)
        core.add("mlp", 2 * mlp, mlp)
    return (tally + core * cfg.num_core_layers) * batch


# ----------------------------------------------------------------------------- model inputs


def model_inputs(cfg: M4VConfig, layout: ClipLayout, batch: int, device, generator=None):
    """Keyword arguments of ``M4V.forward`` for ``layout`` (full text, mask on the host).

    On ``device="meta"`` nothing is allocated. The text mask stays on the host: the model reads
    its values (which text slots are padding), which meta tensors do not have.
    """
    p = cfg.patch_size

    def rand(*shape):
        if torch.device(device).type == "meta":
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=generator).to(device)

    return dict(
        frames=[rand(batch, cfg.in_channels, h * p, w * p) for h, w in layout.frame_sizes],
        frame_ids=list(layout.frame_ids),
        sigma=torch.full((batch,), 0.5, device=device),
        text=rand(batch, layout.text_len, cfg.text_dim),
        text_mask=torch.ones(batch, layout.text_len, dtype=torch.bool),
        pooled=rand(batch, cfg.pooled_dim),
    )


def block_inputs(cfg: M4VConfig, layout: ClipLayout, batch: int, device):
    """Positional arguments of a block's forward, as ``M4V.backbone`` builds them."""
    d = cfg.hidden_size
    text = torch.zeros(batch, layout.text_len, d, device=device)
    video = torch.zeros(batch, layout.video_len, d, device=device)
    c = torch.zeros(batch, d, device=device)
    rope = rope_cos_sin(layout, cfg.rope_axes, device)
    mask = torch.ones(batch, layout.text_len, dtype=torch.bool)
    return text, video, c, layout, rope, mask


def check_layout(cfg: M4VConfig, layout: ClipLayout) -> None:
    if layout.text_len != cfg.max_text_len:
        raise ValueError(f"layout.text_len: got {layout.text_len}, expected the model's fixed "
                         f"prepend length max_text_len={cfg.max_text_len}")


# ----------------------------------------------------------------------------- module counts


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _categorize_core(count: Callable[[str], int], block: str) -> dict[str, int]:
    """Categories of one MM-DiM block from hierarchical per-module counts."""
    parts = {"temporal": count(_join(block, "temporal")), "mlp": count(_join(block, "mlp")),
             "modulation": count(_join(block, "mod"))}
    parts["mixer"] = count(block) - sum(parts.values())
    return parts


def _tally_from_counts(
    cfg: M4VConfig, count: Callable[[str], int], scan_count: Callable[[str], int],
    prefix: str, scan_other_unit: int, native: str,
) -> Tally:
    """Turn hierarchical per-module counts (engine's ``native`` unit) into a :class:`Tally`.

    ``count(path)``: everything under module ``path`` (``prefix`` + relative path);
    ``scan_count(path)``: the scan's part of it. ``scan_other_unit``: all scans in the other unit.
    Matrix-class ops convert exactly (x2 or /2); the scan is only ever in an MM-DiM mixer.
    """
    per_cat = dict.fromkeys(CATEGORIES, 0)
    scans = dict.fromkeys(CATEGORIES, 0)
    per_cat["introducer"] = sum(count(f"{prefix}introducer.{i}")
                                for i in range(cfg.num_introducer_layers))
    core_total = 0
    for i in range(cfg.num_core_layers):
        block = f"{prefix}core.{i}"
        for cat, v in _categorize_core(count, block).items():
            per_cat[cat] += v
        scans["mixer"] += scan_count(block)
        core_total += count(block)
    per_cat["other"] += count(prefix.rstrip(".")) - per_cat["introducer"] - core_total
    total_scan = scan_count(prefix.rstrip("."))
    if scans["mixer"] != total_scan:
        raise RuntimeError(f"scan counted outside the MM-DiM mixers: {total_scan - scans['mixer']}")
    tally = Tally()
    for cat in CATEGORIES:
        matrix = per_cat[cat] - scans[cat]
        other_scan = scan_other_unit if (cat == "mixer" and total_scan) else 0
        if native == "macs":
            tally.add(cat, 2 * matrix + other_scan, per_cat[cat])
        else:
            if matrix % 2:
                raise RuntimeError(f"odd matrix-class FLOP count {matrix} in {cat}")
            tally.add(cat, per_cat[cat], matrix // 2 + other_scan)
    return tally


class _ScanRecorder:
    """FLOPs and MACs of every selective-scan call an engine sees."""

    def __init__(self):
        self.flops = 0
        self.macs = 0

    def record(self, b, d, length, n, with_d, with_z, with_bias, softplus) -> tuple[int, int]:
        args = (b, d, length, n, with_d, with_z, with_bias, bool(softplus))
        f = selective_scan_flops(*args)
        m = selective_scan_flops(*args, multiply_add_as_one=True)
        self.flops += f
        self.macs += m
        return f, m


# ----------------------------------------------------------------------------- flop_counter


def _flop_counter_run(fn: Callable[[], object]) -> tuple[dict[str, dict], _ScanRecorder]:
    """Run ``fn`` under FlopCounterMode: ({module path: {op: FLOPs}}, scan calls)."""
    from torch.utils.flop_counter import FlopCounterMode

    scans = _ScanRecorder()

    def scan_formula(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_shape=None, **_):
        b, d, length = u
        return scans.record(b, d, length, A[1], D is not None, z is not None,
                            delta_bias is not None, delta_softplus)[0]

    def cpu_sdpa_formula(query, key, value, *args, out_shape=None, **kwargs):
        # PyTorch registers no formula for the CPU flash kernel: count it like the CUDA ones
        return 2 * math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])

    mode = FlopCounterMode(display=False, depth=None, custom_mapping={
        torch.ops.m4v.selective_scan: scan_formula,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa_formula,
    })
    with mode, torch.no_grad():
        fn()
    return mode.get_flop_counts(), scans


def _flop_counter_count(module: nn.Module, args: tuple, kwargs: dict | None = None):
    """(count(path), scan_count(path), scans) for one call, paths relative to ``module``."""
    counts, scans = _flop_counter_run(lambda: module(*args, **(kwargs or {})))
    root = type(module).__name__

    def count(path: str) -> int:
        return sum(counts.get(f"{root}.{path}" if path else root, {}).values())

    def scan_count(path: str) -> int:
        ops = counts.get(f"{root}.{path}" if path else root, {})
        return sum(v for op, v in ops.items() if _SCAN_OP in str(op))

    return count, scan_count, scans


def flop_counter_count(cfg: M4VConfig, layout: ClipLayout, batch: int = 1) -> Tally:
    """Count on meta tensors, one block of each kind times the number of blocks."""
    check_layout(cfg, layout)
    tally = Tally()
    with torch.device("meta"):
        bare = M4V(cfg.replace(num_introducer_layers=0, num_core_layers=0))
        intro = MMDiTBlock(cfg) if cfg.num_introducer_layers else None
        core = MMDiMBlock(cfg, 0) if cfg.num_core_layers else None
    count, _, _ = _flop_counter_count(bare, (), model_inputs(cfg, layout, batch, "meta"))
    tally.add("other", count(""), count("") // 2)
    args = block_inputs(cfg, layout, batch, "meta")
    if intro is not None:
        count, _, _ = _flop_counter_count(intro, args)
        block = Tally()
        block.add("introducer", count(""), count("") // 2)
        tally = tally + block * cfg.num_introducer_layers
    if core is not None:
        count, scan_count, scans = _flop_counter_count(core, args)
        block = Tally()
        for cat, v in _categorize_core(count, "").items():
            scan = scan_count("") if cat == "mixer" else 0
            block.add(cat, v, (v - scan) // 2 + (scans.macs if cat == "mixer" else 0))
        tally = tally + block * cfg.num_core_layers
    return tally


def flop_counter_model_count(model: M4V, inputs: dict) -> Tally:
    """Whole-model count with FlopCounterMode on whatever device ``inputs`` live on."""
    count, scan_count, scans = _flop_counter_count(model, (), inputs)
    return _tally_from_counts(model.cfg, count, scan_count, "", scans.macs, native="flops")


# ----------------------------------------------------------------------------- fvcore


def _sdpa_macs_handle(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _scan_handle(scans: _ScanRecorder):
    def handle(inputs, outputs) -> int:
        from fvcore.nn.jit_handles import get_shape

        b, d, length = get_shape(inputs[0])
        n = get_shape(inputs[2])[1]
        present = [get_shape(x) is not None for x in inputs[5:8]]  # D, z, delta_bias
        return scans.record(b, d, length, n, *present, inputs[8].toIValue())[1]

    return handle


class _Forward(nn.Module):
    """M4V with its frames and frame ids bound, so that TorchScript can trace it.

    Frames are not trace inputs: the model reads the token layout from their shapes, and traced
    shapes are tensors (the layout must stay plain ints). Their patch embedding is still traced,
    since it involves the model's parameters.
    """

    def __init__(self, model: M4V, frames: list, frame_ids: list[int]):
        super().__init__()
        self.model = model
        self.frames = frames
        self.frame_ids = frame_ids

    def forward(self, sigma, text, text_mask, pooled):
        return self.model(self.frames, self.frame_ids, sigma, text, text_mask, pooled)


def fvcore_analysis(module: nn.Module, args: tuple):
    """``FlopCountAnalysis`` of ``module(*args)`` with our handles: (analysis, scan recorder).

    Counts are MACs; elementwise handles of fvcore are set to 0 (the convention above).
    """
    import warnings

    from fvcore.nn import FlopCountAnalysis

    scans = _ScanRecorder()
    analysis = FlopCountAnalysis(module, args)
    analysis.set_op_handle(**{
        "aten::scaled_dot_product_attention": _sdpa_macs_handle,
        f"m4v::{_SCAN_OP}": _scan_handle(scans),
        **{op: (lambda i, o: 0) for op in _ZERO_FVCORE_OPS},
    })
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        analysis.total()  # runs the trace once; results are cached on the analysis
    return analysis, scans


def fvcore_model_count(model: M4V, inputs: dict) -> tuple[Tally, dict[str, int]]:
    """Whole-model count with fvcore: (tally, ops fvcore saw but does not count, with counts)."""
    wrapped = _Forward(model, inputs["frames"], inputs["frame_ids"])
    args = (inputs["sigma"], inputs["text"], inputs["text_mask"], inputs["pooled"])
    analysis, scans = fvcore_analysis(wrapped, args)
    by_module = analysis.by_module_and_operator()

    def count(path: str) -> int:
        return sum(by_module.get(path, {}).values())

    def scan_count(path: str) -> int:
        return by_module.get(path, {}).get(_SCAN_OP, 0)

    tally = _tally_from_counts(model.cfg, count, scan_count, "model.", scans.flops, native="macs")
    uncounted = dict(analysis.unsupported_ops())
    return tally, uncounted


def fvcore_count(cfg: M4VConfig, layout: ClipLayout, batch: int = 1, seed: int = 0) -> Tally:
    """Count with fvcore on a real CPU model and real activations (small configs only)."""
    check_layout(cfg, layout)
    torch.manual_seed(seed)
    model = M4V(cfg).eval()
    inputs = model_inputs(cfg, layout, batch, "cpu", torch.Generator().manual_seed(seed))
    return fvcore_model_count(model, inputs)[0]


def count_layout(cfg: M4VConfig, layout: ClipLayout, engine: str, batch: int = 1) -> Tally:
    if engine == "fvcore":
        return fvcore_count(cfg, layout, batch)
    if engine == "flop_counter":
        return flop_counter_count(cfg, layout, batch)
    if engine == "analytic":
        check_layout(cfg, layout)
        return analytic_count(cfg, layout, batch)
    raise ValueError(f"engine: got {engine!r}, expected one of {ENGINES}")
