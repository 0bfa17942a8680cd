"""The M4V model: re-composition, switches, causality, attention mask, RoPE, scale, overfit."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from m4v.config import M4VConfig
from m4v.model import M4V
from m4v.model.blocks import MMDiMBlock
from m4v.model.embeddings import ClipLayout, patchify, sinusoidal_embedding, unpatchify
from m4v.model.layers import rms_norm
from m4v.model.mamba import MambaMixer, channels_to_rows, rows_to_channels, weight_first
from m4v.model.recomposition import SequenceSpec, decompose, recompose, video_scan_index
from m4v.model.rope import apply_rope, axis_positions, rope_cos_sin, video_positions
from m4v.model.temporal import (
    TemporalBranch,
    few_token_attention,
    frame_causal_mask,
    frame_level_to_video,
    frame_level_tokens,
    history_runs,
)
from m4v.ops.attention import _Prefixes, block_causal_attention, block_causal_mask
from m4v.ops.scan_reference import selective_scan_reference
from m4v.ops.zigzag import zigzag_orders

TINY = M4VConfig.preset("tiny")
SIZES = ((1, 2), (2, 4), (4, 8))  # token grids of a pyramid clip: coarse history .. current


def make_inputs(cfg, b=2, sizes=((2, 2), (4, 4), (8, 8), (8, 8)), text_lens=(5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    p = cfg.patch_size
    frames = [torch.randn(b, cfg.in_channels, h * p, w * p, generator=g) for h, w in sizes]
    lt = max(text_lens)
    text = torch.randn(b, lt, cfg.text_dim, generator=g)
    mask = torch.arange(lt)[None] < torch.tensor(text_lens)[:, None]
    return dict(frames=frames, frame_ids=list(range(len(sizes))), sigma=torch.rand(b, generator=g),
                text=text, text_mask=mask, pooled=torch.randn(b, cfg.pooled_dim, generator=g))


def randomize_zero_params(model, seed=1):
    """adaLN-Zero makes a fresh model an identity map; give every zero-initialised tensor values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in model.parameters():
            if not prm.any():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
    return model


# ---------------------------------------------------------------- re-composition


@pytest.mark.parametrize("registers", [True, False])
@pytest.mark.parametrize("text_recomposition", [True, False])
@pytest.mark.parametrize("direction", [None, 0, 3, 7])
def test_recomposition_round_trip(registers, text_recomposition, direction):
    b, lt, d = 3, 6, 5
    lv = sum(h * w for h, w in SIZES)
    text, video = torch.randn(b, lt, d), torch.randn(b, lv, d)
    mask = torch.arange(lt)[None] < torch.tensor([6, 2, 0])[:, None]  # full, short, empty text
    spec = SequenceSpec(SIZES, direction, registers, text_recomposition)
    seq = recompose(text, mask, video, torch.randn(d), spec)
    n_reg = len(SIZES) if registers else 0
    assert seq.shape == (b, lt * (2 if text_recomposition else 1) + lv + n_reg, d)
    text_back, video_back = decompose(seq, mask, spec)
    assert torch.equal(video_back, video)
    assert torch.equal(text_back[mask], text[mask])
    assert not text_back[~mask].any()  # padding slots come back as zeros


def test_prepended_text_is_left_padded_and_appended_right_padded():
    d = 2
    text = torch.arange(1, 5, dtype=torch.float32)[None, :, None].expand(1, 4, d).clone()
    mask = torch.tensor([[True, True, False, False]])
    spec = SequenceSpec(((1, 1),), None, True, True)
    seq = recompose(text, mask, torch.full((1, 1, d), 9.0), torch.full((d,), 7.0), spec)
    assert seq[0, :, 0].tolist() == [0, 0, 1, 2, 7, 9, 1, 2, 0, 0]


def test_sequence_layout_registers_and_orders():
    # Built by hand: frame k starts after its register; zigzag direction d uses zigzag_orders[d].
    spec = SequenceSpec(SIZES, 5, True, True)
    forward, _ = video_scan_index(spec)
    expected, off = [], 1
    for h, w in SIZES:
        expected += [0] + (zigzag_orders(h, w)[5] + off).tolist()
        off += h * w
    assert forward.tolist() == expected
    raster, _ = video_scan_index(SequenceSpec(SIZES, None, False, True))
    assert raster.tolist() == list(range(1, off))  # no registers, plain raster


# ---------------------------------------------------------------- ablation switches


def core_block(**switches):
    return MMDiMBlock(TINY.replace(**switches), layer_idx=3)


def test_switch_registers():
    on, off = core_block(registers=True), core_block(registers=False)
    assert on.register is not None and off.register is None
    layout = ClipLayout(4, SIZES, (0, 1, 2))
    assert on.sequence_spec(layout).registers and not off.sequence_spec(layout).registers


def test_switch_mm_recomposition_picks_layer_direction_or_raster():
    assert core_block(mm_recomposition=True).direction == 3
    assert MMDiMBlock(TINY, layer_idx=11).direction == 3  # i mod 8
    assert core_block(mm_recomposition=False).direction is None


def test_switch_text_recomposition_changes_sequence_length():
    layout = ClipLayout(4, SIZES, (0, 1, 2))
    x = torch.randn(1, 4, TINY.hidden_size)
    v = torch.randn(1, sum(layout.frame_lens), TINY.hidden_size)
    mask = torch.ones(1, 4, dtype=torch.bool)
    lens = {}
    for flag in (True, False):
        blk = core_block(text_recomposition=flag)
        lens[flag] = recompose(x, mask, v, blk.register, blk.sequence_spec(layout)).shape[1]
    assert lens[True] - lens[False] == 4


def test_switch_temporal_branch_parameters():
    off = M4V(TINY.replace(temporal_branch=False))
    assert not any("temporal" in n for n, _ in off.named_parameters())
    assert any("temporal" in n for n, _ in M4V(TINY).named_parameters())


def test_switch_mixer_attention_has_no_ssm():
    names = [n for n, _ in M4V(TINY.replace(mixer="attention")).named_parameters()]
    assert not any("A_log" in n or "register" in n for n in names)
    assert any("core.0.qkv" in n for n in names)


def test_switches_change_the_output():
    inputs = make_inputs(TINY)
    outs = {}
    for name, change in [("base", {}), ("registers", dict(registers=False)),
                         ("text", dict(text_recomposition=False)),
                         ("zigzag", dict(mm_recomposition=False)),
                         ("temporal", dict(temporal_branch=False))]:
        torch.manual_seed(0)
        model = randomize_zero_params(M4V(TINY.replace(**change)))
        with torch.no_grad():
            outs[name] = model(**inputs)
    for name, out in outs.items():
        assert torch.isfinite(out).all()
        if name != "base":
            assert not torch.allclose(out, outs["base"]), name


# ---------------------------------------------------------------- causality


def history_features(model, inputs):
    _, video, _, layout = model.backbone(**inputs)
    return video[:, : layout.frame_offsets[-1]]


@pytest.mark.parametrize("mixer", ["mamba", "attention"])
def test_history_does_not_see_current_frame_when_causal(mixer):
    # Causal by design: block-causal MM-DiT, unidirectional scan, causal temporal branch. The
    # appended text copy is the one deliberate exception (next test), so it is off here.
    cfg = TINY.replace(text_recomposition=False, mixer=mixer, num_core_layers=3)
    model = randomize_zero_params(M4V(cfg)).eval()
    a = make_inputs(cfg)
    b = make_inputs(cfg)
    b["frames"] = a["frames"][:-1] + [torch.randn_like(a["frames"][-1])]
    b.update({k: a[k] for k in ("sigma", "text", "text_mask", "pooled")})
    with torch.no_grad():
        assert torch.allclose(history_features(model, a), history_features(model, b), atol=1e-6)
        assert not torch.allclose(model(**a), model(**b))


def test_text_recomposition_carries_current_frame_back_to_history():
    # With two core layers, layer 1's appended text has seen the current frame and layer 2's
    # prepended copy feeds it to the history frames: the bidirectional fusion the paper wants.
    cfg = TINY.replace(text_recomposition=True, num_core_layers=2)
    model = randomize_zero_params(M4V(cfg)).eval()
    a = make_inputs(cfg)
    b = dict(a, frames=a["frames"][:-1] + [torch.randn_like(a["frames"][-1])])
    with torch.no_grad():
        assert not torch.allclose(history_features(model, a), history_features(model, b))


def test_current_frame_depends_on_text():
    model = randomize_zero_params(M4V(TINY)).eval()
    a = make_inputs(TINY)
    b = dict(a, text=torch.randn_like(a["text"]))
    with torch.no_grad():
        assert not torch.allclose(model(**a), model(**b))


def test_text_padding_is_ignored():
    model = randomize_zero_params(M4V(TINY)).eval()
    a = make_inputs(TINY)
    b = dict(a, text=torch.where(a["text_mask"][..., None], a["text"], 100.0))
    with torch.no_grad():
        assert torch.allclose(model(**a), model(**b), atol=1e-5)


# ---------------------------------------------------------------- attention, temporal branch, RoPE


def test_mixer_matches_the_linear_layer_formulation():
    """The channels-first mixer (projections applied weight-first) against the same mixer written
    with nn.Linear on (b, L, d) tensors and the sequential reference scan, in float64."""
    torch.manual_seed(0)
    mixer = MambaMixer(12, d_state=4, dt_rank=3, scan_backend="reference").double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    xx, z = mixer.in_proj(x).chunk(2, dim=-1)
    xx = F.silu(mixer.conv1d(xx.mT)[..., :9])
    dt, B, C = mixer.x_proj(xx.mT).split([3, 4, 4], dim=-1)
    y, _ = selective_scan_reference(xx, F.linear(dt, mixer.dt_proj.weight).mT,
                                    -torch.exp(mixer.A_log), B.mT, C.mT, mixer.D, z.mT,
                                    mixer.dt_proj.bias, delta_softplus=True)
    torch.testing.assert_close(mixer(x), mixer.out_proj(y.mT), rtol=1e-10, atol=1e-12)


def test_weight_first_under_autocast_casts_the_weight_once():
    w, x = torch.randn(5, 3), torch.randn(4, 3, 7)
    want = torch.einsum("oi,bil->bol", w, x)
    torch.testing.assert_close(weight_first(w, x), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = weight_first(w, x)
    assert got.dtype == torch.bfloat16 and got.is_contiguous()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_sinusoidal_embedding_matches_formula_in_at_least_float32(dtype):
    """cos(t w_i) then sin(t w_i), w_i = 10000^(-i / half); bfloat16 noise levels are widened
    (t x 1000 would lose its fraction), float64 ones kept (float64 reference runs)."""
    t = torch.tensor([0.0, 0.25, 1.0]).to(dtype) * 1000.0
    got = sinusoidal_embedding(t, 7)
    assert got.dtype == torch.promote_types(dtype, torch.float32) and got.shape == (3, 7)
    w = torch.tensor([10000.0 ** (-i / 3) for i in range(3)], dtype=torch.float64)
    args = t.double()[:, None] * w
    want = torch.cat([args.cos(), args.sin(), torch.zeros(3, 1, dtype=torch.float64)], -1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


def test_qk_rms_norm_matches_formula_and_keeps_the_weights_gradient_float32():
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.RMSNorm(8, eps=1e-6)
    torch.nn.init.normal_(norm.weight, generator=g)
    x = torch.randn(2, 3, 5, 8, generator=g)
    want = x.double() * (x.double().square().mean(-1, keepdim=True) + 1e-6).rsqrt()
    want = want * norm.weight.double()
    torch.testing.assert_close(rms_norm(x, norm).double(), want, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rms_norm(x.bfloat16(), norm)
    assert out.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(out.float().sum(), norm.weight)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("batch", [1, 3])
def test_layout_crossing_projections_match_einsum_values_and_gradients(batch):
    """in_proj / out_proj products with hand-written backward passes against einsum under plain
    autograd, float64: values, the gradients of input and weight (one part unused, so its
    gradient is None), and dense results both ways."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    a, b, c = rows_to_channels(x, w, 3)
    want = torch.einsum("oi,bli->bol", w, x).chunk(3, dim=1)
    for got, ref in zip((a, b, c), want, strict=True):
        assert got.is_contiguous()
        torch.testing.assert_close(got, ref)
    wa, wc = torch.randn(a.shape, generator=g, dtype=torch.float64), torch.randn(
        c.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((a * wa).sum() + (c * wc).sum(), (x, w))
    refs = torch.autograd.grad((want[0] * wa).sum() + (want[2] * wc).sum(), (x, w))
    assert grads[0].is_contiguous()
    for got, ref in zip(grads, refs, strict=True):
        torch.testing.assert_close(got, ref)

    y = torch.randn(batch, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    out = channels_to_rows(y, w)
    ref = torch.einsum("bil,oi->blo", y, w)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref)
    wo = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * wo).sum(), (y, w))
    assert grads[0].is_contiguous()
    for got, r in zip(grads, torch.autograd.grad((ref * wo).sum(), (y, w)), strict=True):
        torch.testing.assert_close(got, r)


def test_layout_crossing_projections_under_autocast_give_gradients_in_the_inputs_dtypes():
    x = torch.randn(2, 7, 5, requires_grad=True)
    w = torch.randn(6, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = rows_to_channels(x, w, 2)
        out = channels_to_rows(a, w[:3, :3].contiguous())
    assert a.dtype == out.dtype == torch.bfloat16
    dx, dw = torch.autograd.grad(out.float().sum() + b.float().sum(), (x, w))
    assert dx.dtype == dw.dtype == torch.float32
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    a64, b64 = torch.einsum("oi,bli->bol", w64, x64).chunk(2, dim=1)
    ref = torch.autograd.grad(torch.einsum("bil,oi->blo", a64, w64[:3, :3]).sum() + b64.sum(),
                              (x64, w64))
    torch.testing.assert_close(dx.double(), ref[0], rtol=3e-2, atol=0.3)
    torch.testing.assert_close(dw.double(), ref[1], rtol=3e-2, atol=0.3)


@pytest.mark.parametrize("padded", [True, False])
def test_block_causal_attention_matches_dense_mask(padded):
    """Values and the gradients of q, k and v (per query group, the keys are prefix views whose
    gradients add up in a hand-written backward) against softmax under the dense mask."""
    g = torch.Generator().manual_seed(0)
    lt, frames = 3, [4, 4, 8]
    q, k, v = (torch.randn(2, 2, lt + 16, 8, generator=g, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    text_mask = (torch.tensor([[True, True, False], [True, False, False]]) if padded
                 else torch.ones(2, lt, dtype=torch.bool))
    out = block_causal_attention(q, k, v, lt, frames, text_mask)
    allowed = block_causal_mask(lt, frames)[None, None] & torch.cat(
        [text_mask, torch.ones(2, 16, dtype=torch.bool)], 1)[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
    torch.testing.assert_close(out, ref)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad((ref * weights).sum(), (q, k, v)),
                         strict=True):
        torch.testing.assert_close(got, want)
    mask = block_causal_mask(1, [1, 2])
    assert mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_key_prefixes_gradient_matches_slicing_when_some_are_unused():
    """The prefix views' hand-written backward against autograd through plain slices, with the
    whole-length prefix unused (its gradient is None: the sum then starts from zeros)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ends = (2, 7, 5, 5)
    weights = [torch.randn(2, 3, e, 4, generator=g, dtype=torch.float64) for e in ends]
    used = (0, 2, 3)
    views = _Prefixes.apply(x, ends)
    (got,) = torch.autograd.grad(sum((views[i] * weights[i]).sum() for i in used), x)
    (want,) = torch.autograd.grad(sum((x[:, :, :ends[i]] * weights[i]).sum() for i in used), x)
    torch.testing.assert_close(got, want)


def test_temporal_tokens_split_and_merge():
    # runs of equal-size history frames (two at 2x2, two at 4x4) and an 8x8 current frame
    sizes = ((2, 2), (2, 2), (4, 4), (4, 4), (8, 8))
    layout = ClipLayout(0, sizes, tuple(range(5)))
    assert history_runs(layout) == [(2, 2, 2), (2, 4, 4)]
    x = torch.randn(2, layout.video_len, 3, dtype=torch.float64)
    tokens = frame_level_tokens(x, layout, (2, 2))
    assert tokens.shape == (2, 4 + 16, 3 * 4)
    back = frame_level_to_video(tokens, layout, (2, 2), 3)
    cur = slice(layout.frame_offsets[-1], None)
    assert torch.equal(back[:, cur], x[:, cur])  # the strided split is exact
    # split token (a, b) holds the cells [a::4, b::4] of the current frame
    grid = x[:, cur].reshape(2, 8, 8, 3)
    assert torch.equal(tokens[:, 4 + 1 * 4 + 2].reshape(2, 3, 2, 2),
                       grid[:, 1::4, 2::4].permute(0, 3, 1, 2))
    for i, ((h, w), off) in enumerate(zip(sizes[:-1], layout.frame_offsets, strict=False)):
        frame = x[:, off:off + h * w].reshape(2, h, w, 3).permute(0, 3, 1, 2)
        # a history token is its frame's average pool to the grid, values ordered (c, hs, ws)
        torch.testing.assert_close(tokens[:, i], F.adaptive_avg_pool2d(frame, 2).reshape(2, 12))
        # and goes back to every cell it pooled (nearest upsampling)
        up = F.interpolate(tokens[:, i].reshape(2, 3, 2, 2), size=(h, w), mode="nearest")
        assert torch.equal(back[:, off:off + h * w], up.flatten(2).mT)


def test_frame_causal_mask():
    owner = torch.tensor([0, 1, 2, 2, 2])  # two history frames, the current one split in three
    assert torch.equal(frame_causal_mask(2, 3), owner[None, :] <= owner[:, None])


def test_few_token_attention_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 96, generator=g, dtype=torch.float64) for _ in range(3))
    owner = torch.tensor([0, 1, 2, 2, 2])  # the last frame split into three tokens
    mask = owner[None, :] <= owner[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(few_token_attention(q, k, v, mask), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inside, v's dtype out
        out = few_token_attention(*(t.float() for t in (q, k, v)), mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_temporal_branch_is_causal():
    layout = ClipLayout(0, ((2, 2), (2, 2), (4, 4)), (0, 1, 2))
    branch = TemporalBranch(8, 4, heads=2)
    x = torch.randn(1, layout.video_len, 8)
    y = x.clone()
    y[:, 8:] += 1.0  # change the current frame only
    hist = slice(0, 8)
    assert torch.allclose(branch(x, layout)[:, hist], branch(y, layout)[:, hist])
    assert not torch.allclose(branch(x, layout)[:, 8:], branch(y, layout)[:, 8:])


def test_rope_positions_interpolate_coarse_frames():
    assert axis_positions(2, 4).tolist() == [0.5, 2.5]  # centres of 2 cells covering 4
    assert axis_positions(4, 4).tolist() == [0, 1, 2, 3]
    layout = ClipLayout(0, ((1, 2), (2, 4)), (3, 4))
    pos = video_positions(layout)
    assert pos[:2].tolist() == [[3, 0.5, 0.5], [3, 0.5, 2.5]]
    assert pos[2:4].tolist() == [[4, 0, 0], [4, 0, 1]]


def test_rope_cos_sin_values_and_cache():
    layout = ClipLayout(0, ((1, 2), (2, 4)), (3, 4))
    axes = (2, 4, 4)
    cos, sin = rope_cos_sin(layout, axes, "cpu")
    # token 5 (second frame, row 0, column 3): position (t, h, w) = (4, 0, 3); axis i with dim
    # d_i turns at pos_i * theta^(-2k / d_i), k < d_i / 2, axes one after another
    ang = [4 * 1e4 ** (-2 * k / 2) for k in range(1)] + [0.0] * 2 \
        + [3 * 1e4 ** (-2 * k / 4) for k in range(2)]
    torch.testing.assert_close(cos[5], torch.tensor(ang).cos())
    torch.testing.assert_close(sin[5], torch.tensor(ang).sin())
    again = rope_cos_sin(ClipLayout(0, ((1, 2), (2, 4)), (3, 4)), list(axes), torch.device("cpu"))
    assert again[0] is cos and again[1] is sin  # an equal layout hits the cache


def test_apply_rope_is_complex_rotation():
    x = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    ang = torch.randn(3, 2, dtype=torch.float64)
    out = apply_rope(x, ang.cos(), ang.sin())
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (2, 2))) * torch.polar(
        torch.ones_like(ang), ang)).flatten(-2)
    torch.testing.assert_close(out, ref)


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    t = patchify(x, 2)
    assert t.shape == (2, 6, 12)
    assert t[0, 1].tolist() == x[0, :, 0:2, 2:4].flatten().tolist()
    assert torch.equal(unpatchify(t, 2, 3, 4, 6), x)


# ---------------------------------------------------------------- scale


@pytest.mark.parametrize("preset", ["m4v-2b", "attention-2b"])
def test_paper_presets_build_on_meta(preset):
    cfg = M4VConfig.preset(preset)
    with torch.device("meta"):
        model = M4V(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {n / 1e9:.3f} B parameters")
    assert 1.5e9 < n < 2.6e9
    assert len(model.introducer) == 8 and len(model.core) == 16
    assert cfg.hidden_size == 1920 and cfg.num_heads == 30 and cfg.head_dim == 64


def test_tiny_overfits_one_sample():
    torch.manual_seed(0)
    model = M4V(TINY)
    inputs = make_inputs(TINY, b=1, sizes=((2, 2), (4, 4), (8, 8)), text_lens=(4,))
    target = torch.randn(1, TINY.in_channels, 16, 16, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = F.mse_loss(model(**inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"overfit: loss {losses[0]:.4f} -> {losses[-1]:.5f}")
    assert losses[-1] < losses[0] / 10


@pytest.mark.gpu
def test_mmdim_block_on_cuda_makes_the_host_wait_nowhere():
    """Forward and backward of an MM-DiM block (fused adaLN and conv kernels, re-composition row
    tables built for a text mask not seen before) are all queued: no step reads a value back or
    copies from pageable host memory, either of which would stop the host until the GPU caught
    up. CUDA's sync debug mode turns every such wait into an error. (The chunked torch scan:
    the Triton scan's first compile takes minutes.)"""
    block = randomize_zero_params(MMDiMBlock(TINY.replace(scan_backend="torch"), 3)).cuda()
    layout = ClipLayout(4, ((2, 2), (4, 4), (4, 4)), (0, 1, 2))
    g = torch.Generator(device="cuda").manual_seed(0)
    d = TINY.hidden_size
    text = torch.randn(2, 4, d, device="cuda", generator=g, requires_grad=True)
    video = torch.randn(2, layout.video_len, d, device="cuda", generator=g, requires_grad=True)
    c = torch.randn(2, d, device="cuda", generator=g)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        t, v = block(text, video, c, layout, None, mask)
        (t.square().sum() + v.square().sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(video.grad).all()


@pytest.mark.gpu
def test_model_on_cuda_matches_float64_on_cpu():
    """Every op the model runs differently on CUDA (the fused adaLN kernels, the joint stream's
    partial residual, the projections' and re-composition's hand-written backward passes on
    CUDA tensors) against the float64 CPU model: output and every parameter's gradient."""
    cfg = TINY.replace(scan_backend="torch")
    model = randomize_zero_params(M4V(cfg))
    inputs = make_inputs(cfg, sizes=((2, 2), (4, 4), (8, 8), (8, 8)))

    def run(m, device, dtype):
        args = {k: [f.to(device, dtype) for f in v] if k == "frames"
                else v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point()
                else v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        out = m(**args)
        out.square().mean().backward()
        return out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    # Separate copies: converting a module converts its gradients in place too.
    ref_out, ref = run(copy.deepcopy(model).double(), "cpu", torch.float64)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        out, got = run(model.float().cuda(), "cuda", torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert got.keys() == ref.keys()
    for name, a, b in [("out", out, ref_out)] + [(n, got[n], ref[n]) for n in ref]:
        err = (a.double().cpu() - b).norm() / b.norm().clamp_min(1e-12)
        assert err < 1e-4, (name, err.item())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "mamba_ssm"])
def test_fused_scan_backends_train_like_torch(backend):
    """The whole model on CUDA: gradients with a fused scan equal those with the torch scan
    (itself checked against the sequential reference), and bf16 AdamW steps stay finite."""
    from m4v.ops.scan import backend_unavailable_reason

    if (reason := backend_unavailable_reason(backend, "cuda")) is not None:
        pytest.skip(reason)
    cfg = TINY.replace(scan_backend="torch")
    model = randomize_zero_params(M4V(cfg)).cuda()
    inputs = make_inputs(cfg, sizes=((2, 2), (4, 4), (8, 8), (8, 8)))
    inputs = {k: [f.cuda() for f in v] if k == "frames" else v.cuda() if torch.is_tensor(v) else v
              for k, v in inputs.items()}

    def grads():
        model.zero_grad()
        model(**inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads()
    for block in model.modules():
        if hasattr(block, "scan_backend"):
            block.scan_backend = backend
    got = grads()
    assert got.keys() == expected.keys()
    for name, g in got.items():
        err = (g - expected[name]).norm() / expected[name].norm().clamp_min(1e-12)
        assert err < 1e-3, (name, err.item())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(10):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(**inputs).float().square().mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
        opt.step()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(frames=[torch.randn(2, 5, 16, 16)]), "frames"),
    (lambda a: a.update(frames=a["frames"][:-1] + [torch.randn(2, 12, 15, 16)]), "divisible"),
    (lambda a: a.update(frame_ids=[0, 1]), "frame_ids"),
    (lambda a: a.update(frame_ids=[0, 2, 1, 3]), "increasing"),
    (lambda a: a.update(sigma=torch.rand(3)), "sigma"),
    (lambda a: a.update(text=torch.randn(2, TINY.max_text_len + 1, TINY.text_dim),
                        text_mask=torch.ones(2, TINY.max_text_len + 1, dtype=torch.bool)),
     "max_text_len"),
    (lambda a: a.update(text_mask=a["text_mask"].float()), "text_mask"),
    (lambda a: a.update(pooled=torch.randn(2, 3)), "pooled"),
    (lambda a: a.update(frames=[torch.randn(2, 12, 12, 12), torch.randn(2, 12, 16, 16)],
                        frame_ids=[0, 1]), "integer multiple"),
])
def test_bad_inputs_raise(change, match):
    model = M4V(TINY)
    args = make_inputs(TINY)
    change(args)
    with pytest.raises(ValueError, match=match):
        model(**args)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="preset"):
        M4VConfig.preset("huge")
    with pytest.raises(ValueError, match="scan_backend"):
        TINY.replace(scan_backend="cuda")
    with pytest.raises(ValueError, match="mixer"):
        TINY.replace(mixer="rnn")
    with pytest.raises(ValueError, match="unknown fields"):
        TINY.replace(widht=3)
