"""harness.profile / harness.flops: handles, engines against each other and hand counts, layouts,
timing, sweeps and bad input."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import flops, profile
from m4v.config import M4VConfig
from m4v.model import M4V
from m4v.model.embeddings import ClipLayout
from m4v.ops.scan import selective_scan

TINY = M4VConfig.preset("tiny")
LAYOUT = ClipLayout(TINY.max_text_len, ((2, 2), (4, 4), (8, 8), (8, 8)), (0, 1, 2, 3))


# ---------------------------------------------------------------- handles


class MatmulAndAttention(nn.Module):
    """One linear layer (b, L, 24) -> (b, L, 32) and one SDPA with 4 heads of 8 over 2 key sets."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 32, bias=False)

    def forward(self, x, kv):
        q = self.proj(x).unflatten(-1, (4, 8)).transpose(1, 2)  # (b, 4, L, 8)
        k = kv.unflatten(-1, (4, 8)).transpose(1, 2)  # (b, 4, S, 8)
        return F.scaled_dot_product_attention(q, k, k)


def test_handles_count_one_matmul_and_one_sdpa_exactly():
    b, length, keys = 2, 5, 7
    x, kv = torch.randn(b, length, 24), torch.randn(b, keys, 32)
    matmul_macs = b * length * 24 * 32
    attention_macs = b * 4 * length * keys * (8 + 8)  # QK^T and AV
    analysis, _ = flops.fvcore_analysis(MatmulAndAttention(), (x, kv))
    assert analysis.total() == matmul_macs + attention_macs
    assert analysis.by_operator()["scaled_dot_product_attention"] == attention_macs
    for device in ("cpu", "meta"):  # the CPU flash kernel has a formula of ours; meta decomposes
        module = MatmulAndAttention().to(device)
        count, _, _ = flops._flop_counter_count(module, (x.to(device), kv.to(device)))
        assert count("") == 2 * (matmul_macs + attention_macs)


class OneScan(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.A = nn.Parameter(-torch.rand(d, n) - 0.5)
        self.D = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, u, delta, B, C, z):
        return selective_scan(u, delta, self.A, B, C, D=self.D, z=z, delta_bias=self.bias,
                              delta_softplus=True, backend="torch")


def test_scan_handles_equal_the_hand_formula():
    b, d, length, n = 2, 6, 11, 4
    args = (torch.randn(b, d, length), torch.randn(b, d, length), torch.randn(b, n, length),
            torch.randn(b, n, length), torch.randn(b, d, length))
    # per state element: dt*A, exp, B*(dt u), a*h + x (2), C*h summed (2) = 7 FLOPs; 5 counting
    # a multiply-add once. Per step: dt*u 1, D*u + y 2 (1), silu(z) and product 5, bias 1,
    # softplus 2 -> 11 FLOPs (10 MACs).
    hand_flops = b * d * length * (7 * n + 11)
    hand_macs = b * d * length * (5 * n + 10)
    analysis, scans = flops.fvcore_analysis(OneScan(d, n), args)
    assert analysis.total() == hand_macs and scans.flops == hand_flops
    count, scan_count, recorded = flops._flop_counter_count(OneScan(d, n), args)
    assert count("") == scan_count("") == hand_flops and recorded.macs == hand_macs


# ---------------------------------------------------------------- engines agree


@pytest.mark.parametrize("changes", [
    {},  # the full MM-DiM: registers, text re-composition, zigzag, temporal branch, MLP
    dict(mixer="attention"),
    dict(registers=False, text_recomposition=False, temporal_branch=False, mlp_ratio=0.0),
])
def test_fvcore_flop_counter_and_analytic_agree_exactly(changes):
    cfg = TINY.replace(**changes)
    analytic = flops.analytic_count(cfg, LAYOUT, batch=2)
    meta = flops.flop_counter_count(cfg, LAYOUT, batch=2)  # per block on meta, x blocks
    fv = flops.fvcore_count(cfg, LAYOUT, batch=2)  # whole model, real CPU tensors
    whole = flops.flop_counter_model_count(M4V(cfg), flops.model_inputs(cfg, LAYOUT, 2, "cpu"))
    # tolerance: exact, per category and in both units
    assert meta == analytic and fv == analytic and whole == analytic
    assert analytic.total_flops > 0 and analytic.flops["mixer"] > 0


def test_analytic_matches_a_hand_count_of_the_attention_pairs():
    # text 3, frames of 2 and 4 tokens: text 3x3, frame 1 sees 3+2, frame 2 sees 3+2+4
    assert flops.block_causal_pairs(3, [2, 4]) == 9 + 2 * 5 + 4 * 9
    cfg = TINY.replace(num_introducer_layers=0, num_core_layers=1, mixer="attention",
                       temporal_branch=False, mlp_ratio=0.0)
    lay = ClipLayout(cfg.max_text_len, ((1, 2), (2, 4)), (0, 1))
    d, lt, lv = cfg.hidden_size, cfg.max_text_len, 2 + 8
    pairs = lt * lt + 2 * (lt + 2) + 8 * (lt + 10)
    core = 2 * (4 * (lt + lv) * d * d + 2 * pairs * d) + 2 * d * 3 * d  # qkv+proj, attn, adaLN
    other = 2 * (lv * cfg.patch_dim * d + lt * cfg.text_dim * d + 256 * d + d * d
                 + cfg.pooled_dim * d + d * d + 2 * d * d + 8 * d * cfg.patch_dim)
    assert flops.analytic_count(cfg, lay).total_flops == core + other


def test_paper_scale_counts_on_meta_match_analytic():
    for preset in ("m4v-2b", "attention-2b"):
        r = profile.count_flops(preset, 768, 1280, 121, engine="flop_counter", accountings=())
        cfg = M4VConfig.preset(preset)
        lay = profile.clip_layout(cfg, profile.clip_geometry(768, 1280, 121))
        ref = flops.analytic_count(cfg, lay)
        assert r["total"] == ref.total_flops and r["total_macs"] == ref.total_macs
        assert r["by_module"] == ref.flops
        assert r["layout"]["frame_tokens"] == [240] * 13 + [960, 3840, 3840]
        assert r["layout"]["sequence_tokens"] == 128 + 13 * 240 + 960 + 2 * 3840


def test_auto_engine_is_fvcore_when_small_and_meta_when_large():
    assert profile.count_flops("tiny", 128, 128, 17, accountings=())["engine"] == "fvcore"
    big = profile.count_flops("m4v-2b", 384, 640, 9, accountings=(), engine="auto")
    assert big["engine"] == "flop_counter"


# ---------------------------------------------------------------- layouts and accountings


def test_clip_geometry_maps_pixels_to_latent_tokens():
    g = profile.clip_geometry(768, 1280, 121)
    assert (g.latent_frames, g.latent_height, g.latent_width) == (16, 96, 160)
    assert [g.tokens(s) for s in range(3)] == [(12, 20), (24, 40), (48, 80)]


def test_pyramid_layout_is_eq1_history():
    cfg = M4VConfig.preset("m4v-2b")
    g = profile.clip_geometry(768, 1280, 41)  # 6 latent frames
    lay = profile.clip_layout(cfg, g, "pyramid", frame=5, stage=2)
    # frames 0..2 at quarter, 3 at half, 4 at full (newest history), then the current frame
    assert lay.frame_sizes == ((12, 20),) * 3 + ((24, 40), (48, 80), (48, 80))
    assert lay.frame_ids == (0, 1, 2, 3, 4, 5)
    at_stage1 = profile.clip_layout(cfg, g, "pyramid", frame=5, stage=1)
    assert at_stage1.frame_sizes == ((12, 20),) * 4 + ((24, 40), (24, 40))
    flat = profile.clip_layout(cfg, g, "flat")
    assert flat.frame_sizes == ((48, 80),) * 6


def test_generation_sums_every_forward():
    cfg = TINY
    r = profile.count_flops(cfg, 128, 128, 17, engine="analytic", accountings=("generation",))
    g = profile.clip_geometry(128, 128, 17)
    expected = 0
    for i in range(3):  # frame 0: 20 steps per stage, later 10; CFG doubles the rows
        for stage in range(3):
            lay = profile.clip_layout(cfg, g, "pyramid", i, stage)
            expected += (20 if i == 0 else 10) * 2 * flops.analytic_count(cfg, lay).total_flops
    assert r["generation"]["total"] == expected
    assert r["generation"]["forwards"] == 2 * 60 + 2 * 2 * 30


def test_headline_reductions():
    m = profile.count_flops("m4v-2b", 384, 640, 41, engine="analytic", accountings=("flat",))
    a = profile.count_flops("attention-2b", 384, 640, 41, engine="analytic",
                            accountings=("flat",))
    h = profile.headline(m, a)
    assert set(h) == {"pyramid", "flat"}
    assert h["flat"]["mixer_reduction"] == 1 - m["flat"]["by_module"]["mixer"] / a["flat"][
        "by_module"]["mixer"]
    assert h["pyramid"]["model_flops"] == [m["total"], a["total"]]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("height, width, frames, match", [
    (770, 1280, 121, "height"),  # not a multiple of 16
    (776, 1280, 121, "height"),  # a multiple of 8 only
    (768, 1288, 121, "width"),
    (784, 1280, 121, "pyramid"),  # a multiple of 16 but not of 64: the x1/4 stage breaks
    (768, 1280, 120, "frames"),  # not 1 + 8k
    (768, 1280, 0, "frames"),
])
def test_bad_clip_raises(height, width, frames, match):
    with pytest.raises(ValueError, match=match):
        profile.count_flops("m4v-2b", height, width, frames, engine="analytic")


def test_bad_options_raise():
    with pytest.raises(ValueError, match="engine"):
        profile.count_flops("tiny", 128, 128, 17, engine="ptflops")
    with pytest.raises(ValueError, match="layout"):
        profile.count_flops("tiny", 128, 128, 17, engine="analytic", layout="spiral")
    with pytest.raises(ValueError, match="preset"):
        profile.count_flops("huge", 128, 128, 17)
    with pytest.raises(ValueError, match="accountings"):
        profile.count_flops("tiny", 128, 128, 17, engine="analytic", accountings=("fast",))


# ---------------------------------------------------------------- timing and sweeps


def test_time_fn_counts_calls_and_orders_statistics():
    calls = []
    t = profile.time_fn(lambda: calls.append(1), "cpu", warmup=2, repeats=5)
    assert len(calls) == 7
    assert t["min_ms"] <= t["median_ms"] <= t["max_ms"] and t["timer"] == "perf_counter"
    with pytest.raises(ValueError, match="repeats"):
        profile.time_fn(lambda: None, "cpu", repeats=0)


def test_latency_on_cpu_for_a_tiny_clip():
    r = profile.profile_latency("tiny", 64, 64, 9, what=("core_block", "model"),
                                device="cpu", dtype="float32", warmup=0, repeats=1)
    for kind in ("core_block", "model"):
        for mode in ("fwd", "fwdbwd"):
            assert r["latency"][kind][mode]["median_ms"] > 0
    assert r["scan_backend"] == "torch"
    rows = profile.latency_rows("t", r)
    assert {row["metric"] for row in rows} == {f"latency.{k}.{m}" for k in ("core_block", "model")
                                               for m in ("fwd", "fwdbwd")}


def test_sweep_slopes_store_and_plot(tmp_path):
    spec = {"name": "t", "presets": ["m4v-2b", "attention-2b"], "resolutions": [[384, 640]],
            "latent_frames": [8, 16], "layouts": ["flat"], "engine": "analytic"}
    result = profile.sweep(spec, progress=False)
    slopes = result["slopes"]
    assert 0.95 < slopes["m4v-2b 384x640 flat"] < 1.05  # linear in tokens
    assert slopes["attention-2b 384x640 flat"] > 1.4  # quadratic term dominates
    png = profile.plot_sweep(result, tmp_path / "s.png")
    assert png.stat().st_size > 10_000
    rows = [row for p in result["points"] for row in profile.flop_rows("t", p["flops"])]
    print(profile.store_rows(rows, str(tmp_path / "r.duckdb")))
    from harness.store import Store

    stored = Store(str(tmp_path / "r.duckdb")).records(
        "SELECT model, value FROM profiles WHERE metric = 'flops.total' ORDER BY value")
    assert len(stored) == 4
    assert json.loads(json.dumps(result))["suite"] == "t"


def test_suite_file_loads():
    spec = profile.load_suite("suites/profile_paper.yaml")
    assert spec["presets"] == ["m4v-2b", "attention-2b"]
    assert max(spec["latent_frames"]) == 16 and min(spec["latent_frames"]) == 1
    assert [list(r) for r in spec["resolutions"]] == [[384, 640], [768, 1280]]
