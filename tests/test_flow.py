"""Tests of m4v.flow: schedule constants, pyramid/noise statistics, eq. (1) history layout, the
training loss (exactness against an oracle, grouping, dropout) and the sampler (oracle round
trip, CFG identity). The model is replaced by small stand-ins with M4V's call signature."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from m4v.flow import (
    PyramidFlowLoss,
    PyramidSampler,
    PyramidSchedule,
    block_noise,
    corrupt_history,
    downsample,
    downsample_noise,
    history_frames,
    history_stages,
    split_by_ratio,
    stage_pyramid,
    upsample_nearest,
)

POOLED = 3


def text_batch(b, length=5, width=6, offset=1.0):
    """Text whose pooled[:, 0] carries the row index (+ offset) so stand-ins can find the row."""
    tokens = torch.randn(b, length, width)
    mask = torch.ones(b, length, dtype=torch.bool)
    pooled = torch.zeros(b, POOLED)
    pooled[:, 0] = torch.arange(b) + offset
    return SimpleNamespace(tokens=tokens, mask=mask, pooled=pooled)


def empty_text(length=2, width=6):
    return SimpleNamespace(
        tokens=torch.zeros(1, length, width),
        mask=torch.tensor([[True, False]])[:, :length],
        pooled=torch.zeros(1, POOLED),
    )


# ----------------------------------------------------------------------------- schedule


def test_schedule_constants_match_pyramidflow():
    s = PyramidSchedule(stages=3, gamma=1 / 3)
    assert [round(v, 3) for v in s.start_sigmas] == [1.0, 0.800, 0.501]
    assert round(s.start_sigmas[2], 4) == 0.5007
    assert [round(v, 3) for v in s.end_sigmas] == [0.667, 0.334, 0.0]
    a1, b1 = s.renoise(1)
    a2, b2 = s.renoise(2)
    assert (round(a1, 3), round(b1, 3)) == (0.600, 0.693)
    assert (round(a2, 3), round(b2, 3)) == (0.750, 0.434)
    assert s.stage_range == (0.0, 1 / 3, 2 / 3, 1.0)


@pytest.mark.parametrize("gamma", [1 / 3, 0.2, 0.05])
def test_jump_lands_on_corrected_start(gamma):
    """alpha * up(s n + (1-s) d) + beta * block must be sigma' n' + (1-sigma') up(d) with an
    isotropic unit-variance n': data coefficient alpha (1-s) = 1 - sigma', noise covariance
    (alpha s)^2 11^T + beta^2 ((1+g)I - g 11^T) = sigma'^2 I."""
    s = PyramidSchedule(stages=4, gamma=gamma)
    for k in range(1, 4):
        alpha, beta = s.renoise(k)
        s_prev_end = s.end_sigmas[k - 1]
        start = s.start_sigmas[k]
        assert alpha * (1 - s_prev_end) == pytest.approx(1 - start, abs=1e-12)
        assert (alpha * s_prev_end) ** 2 - beta**2 * gamma == pytest.approx(0, abs=1e-12)
        assert beta**2 * (1 + gamma) == pytest.approx(start**2, abs=1e-12)


def test_schedule_two_stages_and_discrete_table():
    s = PyramidSchedule(stages=2)
    # boundary 0.5 -> sigma 0.5; o = 0.5, alpha = 1 / (2 * 0.5 + 0.5) -> start 1 - alpha * 0.5
    assert s.end_sigmas == (0.5, 0.0)
    assert s.start_sigmas[1] == pytest.approx(2 / 3)
    one = PyramidSchedule(stages=1)
    assert (one.start_sigmas, one.end_sigmas) == ((1.0,), (0.0,))
    # exact thirds would give 1/3 and 0.5, PyramidFlow's 1000-entry table gives 0.334 / 0.50075
    fine = PyramidSchedule(num_train_timesteps=3_000_000)
    assert fine.end_sigmas[1] == pytest.approx(1 / 3, abs=1e-6)
    assert fine.start_sigmas[2] == pytest.approx(0.5, abs=1e-6)


def test_schedule_local_grid_and_global_sigma():
    s = PyramidSchedule()
    grid = s.stage_local_sigmas(4)
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert s.global_sigma(1, 1.0) == pytest.approx(s.start_sigmas[1])
    assert s.global_sigma(1, 0.0) == pytest.approx(s.end_sigmas[1])
    assert s.global_sigma(2, 0.5) == pytest.approx(0.5 * s.start_sigmas[2])


@pytest.mark.parametrize(
    "kwargs, name",
    [({"stages": 0}, "stages"), ({"gamma": 0}, "gamma"),
     ({"stage_range": [0, 0.5, 0.4, 1]}, "stage_range"), ({"stage_range": [0, 1]}, "stage_range")],
)
def test_schedule_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PyramidSchedule(**kwargs)
    with pytest.raises(ValueError, match="stage"):
        PyramidSchedule().renoise(0)
    with pytest.raises(ValueError, match="steps"):
        PyramidSchedule.stage_local_sigmas(0)


# ----------------------------------------------------------------------------- pyramid


def test_downsample_is_bilinear_half_and_upsample_is_nearest():
    x = torch.randn(2, 3, 8, 12)
    ref = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    torch.testing.assert_close(downsample(x), ref)
    ref2 = F.interpolate(ref, scale_factor=0.5, mode="bilinear", align_corners=False)
    torch.testing.assert_close(downsample(x, 2), ref2)
    up_ref = F.interpolate(x, scale_factor=4, mode="nearest")
    torch.testing.assert_close(upsample_nearest(x, 2), up_ref)
    clip = torch.randn(2, 3, 4, 8, 12)  # (b, C, t, h, w): per-frame result
    down = downsample(clip)
    assert down.shape == (2, 3, 4, 4, 6)
    for t in range(4):
        torch.testing.assert_close(down[:, :, t], downsample(clip[:, :, t]))
    pyr = stage_pyramid(clip, 3)
    assert [p.shape[-2:] for p in pyr] == [(2, 3), (4, 6), (8, 12)]
    torch.testing.assert_close(pyr[0], downsample(clip, 2))
    with pytest.raises(ValueError, match="x"):
        downsample(torch.randn(1, 1, 6, 6), 2)


def test_downsampled_noise_keeps_unit_variance():
    g = torch.Generator().manual_seed(1)
    n = torch.randn(64, 4, 32, 32, generator=g)
    for levels in (1, 2):
        d = downsample_noise(n, levels)
        assert d.var().item() == pytest.approx(1.0, abs=0.05)
        assert d.mean().item() == pytest.approx(0.0, abs=0.03)


def _block_cells(noise):
    """(N, h, w) -> (N * h/2 * w/2, 4): the 2x2 cells of every block, row-major."""
    n, h, w = noise.shape
    return noise.reshape(n, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4)


@pytest.mark.parametrize("gamma", [1 / 3, 0.2])
def test_block_noise_covariance(gamma):
    g = torch.Generator().manual_seed(2)
    noise = block_noise((200, 16, 16), gamma, generator=g)
    assert noise.shape == (200, 16, 16)
    cells = _block_cells(noise)  # 12800 blocks
    cov = cells.T @ cells / cells.shape[0]
    expected = (1 + gamma) * torch.eye(4) - gamma * torch.ones(4, 4)
    torch.testing.assert_close(cov, expected, atol=0.04, rtol=0)
    # independent across blocks: a cell and the neighbouring block's cells are uncorrelated
    left, right = noise[:, :, 0:14:2], noise[:, :, 2:16:2]
    assert (left * right).mean().abs().item() < 0.03
    below = noise[:, 2:16:2, :]
    assert (noise[:, 0:14:2, :] * below).mean().abs().item() < 0.03
    if gamma == 1 / 3:  # singular covariance: every block sums to zero
        assert cells.sum(1).abs().max().item() < 1e-5


def test_block_noise_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        block_noise((2, 4, 4), 0.5)
    with pytest.raises(ValueError, match="shape"):
        block_noise((2, 3, 4))


@pytest.mark.parametrize("stage", [1, 2])
def test_renoising_keeps_unit_isotropic_variance(stage):
    """The noise part of a renoised stage start, divided by its sigma, is white: unit variance,
    no correlation inside the 2x2 blocks that nearest upsampling created."""
    s = PyramidSchedule()
    alpha, beta = s.renoise(stage)
    g = torch.Generator().manual_seed(3)
    coarse = torch.randn(400, 8, 8, generator=g)
    noise = alpha * s.end_sigmas[stage - 1] * upsample_nearest(coarse)
    noise = noise + beta * block_noise(noise.shape, s.gamma, generator=g)
    noise = noise / s.start_sigmas[stage]
    cells = _block_cells(noise)
    cov = cells.T @ cells / cells.shape[0]
    torch.testing.assert_close(cov, torch.eye(4), atol=0.04, rtol=0)


# ----------------------------------------------------------------------------- history


def eq1_layout(i, stage):
    """Eq. (1) for 3 stages, written out: newest at the current stage, the one before one level
    coarser, all older ones at the coarsest (stage 0); clamped at stage 0."""
    layout = []
    for j in range(i):
        if j == i - 1:
            k = stage
        elif j == i - 2:
            k = max(stage - 1, 0)
        else:
            k = 0
        layout.append((j, k))
    return layout


def test_history_layout_eq1():
    assert history_stages(0, 2) == []
    assert history_stages(3, 2) == [(0, 0), (1, 1), (2, 2)]
    assert history_stages(4, 1) == [(0, 0), (1, 0), (2, 0), (3, 1)]
    assert history_stages(2, 0) == [(0, 0), (1, 0)]
    for i in range(1, 6):
        for stage in range(3):
            assert history_stages(i, stage) == eq1_layout(i, stage)


def test_history_frames_resolutions_and_content():
    clip = torch.randn(2, 3, 6, 16, 8)
    pyr = stage_pyramid(clip, 3)
    for i in range(1, 6):
        for stage in range(3):
            frames, ids = history_frames(pyr, i, stage)
            assert ids == list(range(i))
            for f, (j, k) in zip(frames, eq1_layout(i, stage), strict=True):
                scale = 2 ** (2 - k)
                assert f.shape == (2, 3, 16 // scale, 8 // scale)
                torch.testing.assert_close(f, downsample(clip[:, :, j], 2 - k))
    with pytest.raises(ValueError, match="frame"):
        history_frames(pyr, 7, 0)


def test_history_corruption_per_sample_uniform():
    g = torch.Generator().manual_seed(4)
    frames = [torch.ones(1500, 1, 64, 64), torch.ones(1500, 1, 32, 32)]
    out = corrupt_history(frames, 1 / 3, generator=g)
    # out = s * eps + (1 - s): the frame mean estimates 1 - s, the std estimates s
    s_mean = 1 - out[0].mean(dim=(1, 2, 3))
    s_std, s_std_small = (o.std(dim=(1, 2, 3)) for o in out)
    torch.testing.assert_close(s_std_small, s_std, atol=0.04, rtol=0)  # shared per sample
    torch.testing.assert_close(s_mean, s_std, atol=0.03, rtol=0)
    assert s_std.min().item() >= 0 and s_std.max().item() < 1 / 3 + 0.02
    assert s_std.mean().item() == pytest.approx(1 / 6, abs=0.01)
    assert s_std.var().item() == pytest.approx((1 / 3) ** 2 / 12, rel=0.1)
    assert corrupt_history(frames, 0.0)[0] is frames[0]


# ----------------------------------------------------------------------------- stand-in models


class Oracle(nn.Module):
    """Exact velocity toward known clean latents, written from the flow's definition.

    The row of each sample comes from pooled[:, 0] - 1. From x and sigma it infers the noise n
    of the straight stage path x = r start + (1 - r) end (r from sigma), then returns start - end.
    It records the inferred noise and asserts the eq. (1) history layout and content.
    """

    def __init__(self, clean, schedule, history_atol=1e-5, offsets=None):
        super().__init__()
        self.pyr = stage_pyramid(clean, schedule.stages)
        self.schedule = schedule
        self.history_atol = history_atol
        self.offsets = offsets
        self.calls = []

    def forward(self, frames, frame_ids, sigma, text, mask, pooled):
        x, i = frames[-1], frame_ids[-1]
        rows = (pooled[:, 0].round() - 1).long()
        stage = next(k for k, p in enumerate(self.pyr) if p.shape[-2:] == x.shape[-2:])
        assert frame_ids[:-1] == list(range(i))
        for f, (j, k) in zip(frames[:-1], history_stages(i, stage), strict=True):
            torch.testing.assert_close(f, self.pyr[k][rows, :, j], atol=self.history_atol, rtol=0)
        s0, s1 = self.schedule.start_sigmas[stage], self.schedule.end_sigmas[stage]
        clean = self.pyr[stage][rows, :, i]
        coarse = upsample_nearest(self.pyr[stage - 1][rows, :, i]) if stage else torch.zeros_like(x)
        r = ((sigma - s1) / (s0 - s1)).view(-1, 1, 1, 1)
        data = r * (1 - s0) * coarse + (1 - r) * (1 - s1) * clean
        noise = (x - data) / sigma.view(-1, 1, 1, 1)
        self.calls.append(dict(frame=i, stage=stage, r=r.flatten(), noise=noise, rows=rows,
                               sigma=sigma, tokens=text, batch=x.shape[0]))
        v = (s0 - s1) * noise + (1 - s0) * coarse - (1 - s1) * clean
        if self.offsets is not None:
            v = v + self.offsets[rows].view(-1, 1, 1, 1)
        return v


class TinyVelocity(nn.Module):
    """Trainable stand-in: a conv of the current frame and sigma, plus a pooled-text bias."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.text = nn.Linear(POOLED, channels)

    def forward(self, frames, frame_ids, sigma, text, mask, pooled):
        x = frames[-1]
        s = sigma.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])
        return self.conv(torch.cat([x, s], 1)) + self.text(pooled)[:, :, None, None]


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("frame_sampling", ["batch", "sample"])
def test_loss_is_zero_for_the_exact_velocity(frame_sampling):
    """The oracle knows only the clean latents and the stage definitions; the loss is ~0 only if
    x, sigma, the target and the (uncorrupted) history are all built as documented."""
    b, c, t = 8, 3, 4
    clean = torch.randn(b, c, t, 32, 32)
    sched = PyramidSchedule()
    loss_fn = PyramidFlowLoss(sched, text_dropout=0.0, history_noise=0.0,
                              frame_sampling=frame_sampling)
    oracle = Oracle(clean, sched)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        out = loss_fn(oracle, clean, text_batch(b), empty_text(), gen)
        assert out.loss.item() < 1e-9
    # the noise of every stage is unit-variance white noise (full-res noise pooled, times 2)
    for stage in range(3):
        noise = torch.cat([k["noise"].flatten() for k in oracle.calls if k["stage"] == stage])
        assert noise.var().item() == pytest.approx(1.0, abs=0.25)
    # a model that believes another schedule is penalised: the test can fail
    wrong = Oracle(clean, PyramidSchedule(gamma=0.2))
    out = loss_fn(wrong, clean, text_batch(b), empty_text(), torch.Generator().manual_seed(0))
    assert out.loss.item() > 1e-3


def test_loss_grouping_and_weighting():
    b, c, t = 12, 2, 5
    clean = torch.randn(b, c, t, 8, 8)
    sched = PyramidSchedule()
    offsets = torch.linspace(-1.0, 2.0, b)
    oracle = Oracle(clean, sched, offsets=offsets)
    loss_fn = PyramidFlowLoss(sched, text_dropout=0.0, history_noise=0.0, frame_sampling="sample")
    out = loss_fn(oracle, clean, text_batch(b), empty_text(), torch.Generator().manual_seed(5))
    # each sample's MSE is its offset squared; the batch loss is the mean of per-sample MSEs
    assert out.loss.item() == pytest.approx((offsets**2).mean().item(), rel=1e-5)
    seen = torch.cat([call["rows"] for call in oracle.calls])
    assert sorted(seen.tolist()) == list(range(b))  # every sample exactly once
    assert len(oracle.calls) == len({(g.stage, g.frame) for g in out.groups}) == len(out.groups)
    for call, group in zip(oracle.calls, out.groups, strict=True):
        assert (call["stage"], call["frame"]) == (group.stage, group.frame)
        assert call["batch"] == group.size
        assert (out.stages[call["rows"]] == group.stage).all()
        assert (out.frames[call["rows"]] == group.frame).all()
        s0, s1 = sched.start_sigmas[group.stage], sched.end_sigmas[group.stage]
        assert ((call["sigma"] >= s1) & (call["sigma"] <= s0)).all()
        assert call["noise"].shape[-1] == 8 // 2 ** (2 - group.stage)
    assert torch.bincount(out.stages, minlength=3).tolist() == [3, 6, 3]  # ratios [1, 2, 1]

    batch_mode = PyramidFlowLoss(sched, text_dropout=0.0, history_noise=0.0)
    oracle.calls.clear()
    out = batch_mode(oracle, clean, text_batch(b), empty_text(), torch.Generator().manual_seed(6))
    assert len(oracle.calls) == 3 and len(set(out.frames.tolist())) == 1
    assert [call["batch"] for call in oracle.calls] == [3, 6, 3]


def test_split_by_ratio():
    assert split_by_ratio(8, (1, 2, 1)).tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    assert split_by_ratio(6, (1, 0, 1)).tolist() == [0, 0, 0, 2, 2, 2]
    g = torch.Generator().manual_seed(7)
    draws = torch.cat([split_by_ratio(1, (1, 2, 1), g) for _ in range(2000)])
    freq = torch.bincount(draws, minlength=3).float() / 2000
    torch.testing.assert_close(freq, torch.tensor([0.25, 0.5, 0.25]), atol=0.03, rtol=0)


def test_loss_text_dropout_rate_and_replacement():
    b, c = 64, 2
    clean = torch.randn(b, c, 2, 8, 8)
    seen = []

    def record(frames, frame_ids, sigma, text, mask, pooled):
        seen.append((text, mask, pooled))
        return torch.zeros_like(frames[-1])

    loss_fn = PyramidFlowLoss(text_dropout=0.1)
    g = torch.Generator().manual_seed(8)
    flags = []
    for _ in range(40):
        seen.clear()
        out = loss_fn(record, clean, text_batch(b, length=5), empty_text(length=2), g)
        for text, mask, pooled in seen:
            dropped = pooled[:, 0] == 0  # real prompts carry row index + 1 in pooled[:, 0]
            flags.append(dropped)
            assert text.shape[1] == 5  # empty text right-padded to the prompt length
            assert (mask[dropped] == torch.tensor([True, False, False, False, False])).all()
            assert (text[dropped] == 0).all() and mask[~dropped].all()
        assert sum(int(f.sum()) for f in flags[-len(seen):]) == int(out.text_dropped.sum())
    rate = torch.cat(flags).float().mean().item()
    assert rate == pytest.approx(0.1, abs=0.02)


def test_loss_falls_on_fixed_batch():
    torch.manual_seed(0)
    b, c = 8, 3
    clean = torch.randn(b, c, 3, 8, 8)
    text = text_batch(b)
    model = TinyVelocity(c)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = PyramidFlowLoss()
    losses = []
    for _ in range(60):
        out = loss_fn(model, clean, text, empty_text(), torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert set(out.stage_losses()) == {0, 1, 2}


def test_loss_bad_input():
    loss_fn = PyramidFlowLoss()
    model = TinyVelocity(2)
    with pytest.raises(ValueError, match="latents"):
        loss_fn(model, torch.randn(2, 2, 2, 12, 16), text_batch(2), empty_text())
    with pytest.raises(ValueError, match="latents"):
        loss_fn(model, torch.randn(2, 2, 16, 16), text_batch(2), empty_text())
    with pytest.raises(ValueError, match="empty_text"):
        loss_fn(model, torch.randn(2, 2, 2, 16, 16), text_batch(2), text_batch(3))
    with pytest.raises(ValueError, match="stage_ratios"):
        PyramidFlowLoss(stage_ratios=(1, 1))


# ----------------------------------------------------------------------------- sampler


def test_sampler_reproduces_target_with_oracle():
    """End-to-end stage bookkeeping: starting noise, Euler steps, sigma passed to the model,
    upsampling + renoising at the jumps and the history layout must all agree with the flow's
    definition, or the oracle's inferred noise drifts and the output misses the target."""
    b, c, t, h, w = 2, 4, 3, 16, 32
    target = torch.randn(b, c, t, h, w)
    sched = PyramidSchedule()
    oracle = Oracle(target, sched, history_atol=1e-4)
    sampler = PyramidSampler(sched, first_frame_steps=(3, 2, 4), steps=(2, 1, 2), progress=False)
    neg = text_batch(b, length=2)  # same row codes, different tokens
    out = sampler(oracle, text_batch(b), neg, num_frames=t, latent_hw=(h, w), channels=c,
                  generator=torch.Generator().manual_seed(9))
    assert out.shape == (b, c, t, h, w)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)

    calls = oracle.calls
    per_frame = [sum(1 for k in calls if k["frame"] == i) for i in range(t)]
    assert per_frame == [9, 5, 5]
    for call in calls:  # CFG: cond and uncond rows in one call
        assert call["batch"] == 2 * b and call["tokens"].shape[1] == 5
        torch.testing.assert_close(call["noise"][:b], call["noise"][b:])
    for i in range(t):
        first_noise = {}
        for stage in range(3):
            stage_calls = [k for k in calls if k["frame"] == i and k["stage"] == stage]
            # the noise of a stage's path is constant across its Euler steps
            for k in stage_calls[1:]:
                torch.testing.assert_close(k["noise"], stage_calls[0]["noise"], atol=1e-4, rtol=0)
            assert stage_calls[0]["r"].tolist() == pytest.approx([1.0] * 2 * b)
            first_noise[stage] = stage_calls[0]["noise"][:b]
        # renoising keeps the coarse noise: with gamma = 1/3 the block noise has zero block mean,
        # so the stage-s noise pooled (x2) is exactly the stage s-1 noise, as in training
        for stage in (1, 2):
            torch.testing.assert_close(downsample_noise(first_noise[stage]), first_noise[stage - 1],
                                       atol=1e-4, rtol=0)
        full = first_noise[2]
        assert full.var().item() == pytest.approx(1.0, abs=0.2)


class PooledAffine(nn.Module):
    """Velocity affine in the pooled text: v = conv(x) + sigma + W pooled."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.text = nn.Linear(POOLED, channels)

    def forward(self, frames, frame_ids, sigma, text, mask, pooled):
        history = sum(f.mean() for f in frames[:-1]) if len(frames) > 1 else 0.0
        return (self.conv(frames[-1]) + sigma.view(-1, 1, 1, 1) + 0.1 * history
                + self.text(pooled)[:, :, None, None])


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cfg_equals_conditional_path_of_guided_text(guidance):
    """For a velocity affine in the pooled text, v_u + g (v_c - v_u) is the velocity for pooled
    u + g (c - u): CFG must equal the conditional-only path with that text (g = 1: the plain
    conditional path)."""
    b, c = 2, 2
    torch.manual_seed(1)
    model = PooledAffine(c)
    cond, neg = text_batch(b), text_batch(b, offset=-3.0)
    neg.pooled[:, 1:] = torch.randn(b, POOLED - 1)
    mixed = text_batch(b)
    mixed.pooled = neg.pooled + guidance * (cond.pooled - neg.pooled)
    kwargs = dict(num_frames=2, latent_hw=(8, 8), channels=c)
    guided = PyramidSampler(first_frame_guidance=guidance, guidance=guidance,
                            first_frame_steps=(2, 2, 2), steps=(1, 2, 1), progress=False)
    plain = PyramidSampler(first_frame_guidance=1.0, guidance=1.0,
                           first_frame_steps=(2, 2, 2), steps=(1, 2, 1), progress=False)
    out = guided(model, cond, neg, generator=torch.Generator().manual_seed(3), **kwargs)
    ref = plain(model, mixed, None, generator=torch.Generator().manual_seed(3), **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    uncond_only = plain(model, neg, None, generator=torch.Generator().manual_seed(3), **kwargs)
    assert not torch.allclose(out, uncond_only)


def test_sampler_bad_input_and_shapes():
    model = PooledAffine(2)
    sampler = PyramidSampler(progress=False, first_frame_steps=(1, 1, 1), steps=(1, 1, 1))
    out = sampler(model, text_batch(3), empty_text(), num_frames=2, latent_hw=(8, 16), channels=2)
    assert out.shape == (3, 2, 2, 8, 16)
    with pytest.raises(ValueError, match="latent_hw"):
        sampler(model, text_batch(1), empty_text(), num_frames=1, latent_hw=(12, 16), channels=2)
    with pytest.raises(ValueError, match="neg_text"):
        sampler(model, text_batch(1), None, num_frames=1, latent_hw=(8, 8), channels=2)
    with pytest.raises(ValueError, match="num_frames"):
        sampler(model, text_batch(1), empty_text(), num_frames=0, latent_hw=(8, 8), channels=2)
    with pytest.raises(ValueError, match="steps"):
        PyramidSampler(steps=(10, 10))
    with pytest.raises(ValueError, match="first_frame_steps"):
        PyramidSampler(first_frame_steps=(10, 0, 10))
    assert math.isfinite(out.abs().max().item())


@pytest.mark.gpu
def test_cuda_latents_with_cpu_generator_match_cpu():
    """Noise is drawn on the generator's device, so a CPU generator gives the same samples
    whether the model runs on CPU or CUDA."""
    torch.manual_seed(2)
    model = PooledAffine(2)
    text, neg = text_batch(2), text_batch(2, offset=-1.0)
    sampler = PyramidSampler(first_frame_steps=(2, 2, 2), steps=(1, 1, 1), progress=False)
    kwargs = dict(num_frames=2, latent_hw=(16, 16), channels=2)
    ref = sampler(model, text, neg, generator=torch.Generator().manual_seed(4), **kwargs)
    cuda = lambda t: SimpleNamespace(tokens=t.tokens.cuda(), mask=t.mask.cuda(),
                                     pooled=t.pooled.cuda())
    out = sampler(model.cuda(), cuda(text), cuda(neg), generator=torch.Generator().manual_seed(4),
                  **kwargs)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, atol=2e-2, rtol=2e-2)
    clean = torch.randn(4, 2, 3, 16, 16)
    loss_fn = PyramidFlowLoss(frame_sampling="sample")
    cpu_loss = loss_fn(model.cpu(), clean, text_batch(4), empty_text(),
                       torch.Generator().manual_seed(5)).loss
    gpu_loss = loss_fn(model.cuda(), clean.cuda(), cuda(text_batch(4)), cuda(empty_text()),
                       torch.Generator().manual_seed(5)).loss
    assert gpu_loss.device.type == "cuda"
    assert gpu_loss.item() == pytest.approx(cpu_loss.item(), rel=2e-2)
