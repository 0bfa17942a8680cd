"""VBench leaderboard scoring against hand-computed cases."""

import math

import pytest

from harness.vbench.scoring import (
    ALL_DIMENSIONS,
    QUALITY_DIMENSIONS,
    SEMANTIC_DIMENSIONS,
    aggregate,
)

RAW = {
    "subject_consistency": 0.95, "background_consistency": 0.96, "temporal_flickering": 0.97,
    "motion_smoothness": 0.98, "aesthetic_quality": 0.60, "imaging_quality": 0.65,
    "dynamic_degree": 0.40, "object_class": 0.90, "multiple_objects": 0.50, "human_action": 0.90,
    "color": 0.80, "spatial_relationship": 0.60, "scene": 0.40, "appearance_style": 0.20,
    "temporal_style": 0.25, "overall_consistency": 0.27,
}


def test_dimension_lists_are_vbench_leaderboard():
    assert len(QUALITY_DIMENSIONS) == 7 and len(SEMANTIC_DIMENSIONS) == 9
    assert set(ALL_DIMENSIONS) == set(RAW)


def test_full_case_by_hand():
    quality = (
        (0.95 - 0.1462) / (1.0 - 0.1462)
        + (0.96 - 0.2615) / (1.0 - 0.2615)
        + (0.97 - 0.6293) / (1.0 - 0.6293)
        + (0.98 - 0.706) / (0.9975 - 0.706)
        + 0.60 + 0.65 + 0.5 * 0.40
    ) / 6.5
    semantic = (
        0.90 + 0.50 + 0.90 + 0.80 + 0.60
        + 0.40 / 0.8222
        + (0.20 - 0.0009) / (0.2855 - 0.0009)
        + 0.25 / 0.364
        + 0.27 / 0.364
    ) / 9
    out = aggregate(RAW)
    assert out["quality"] == pytest.approx(quality, abs=1e-12)
    assert out["semantic"] == pytest.approx(semantic, abs=1e-12)
    assert out["total"] == pytest.approx((4 * quality + semantic) / 5, abs=1e-12)
    assert out["partial"] is False and out["missing"] == []
    assert out["normalized"]["dynamic_degree"] == pytest.approx(0.2)
    # a plausible leaderboard-like row lands in a plausible place
    assert 0.7 < out["total"] < 0.9


def test_extremes_map_to_zero_and_one():
    top = {d: 1.0 for d in ALL_DIMENSIONS}
    top.update(motion_smoothness=0.9975, scene=0.8222, appearance_style=0.2855,
               temporal_style=0.364, overall_consistency=0.364)
    out = aggregate(top)
    assert (out["total"], out["quality"], out["semantic"]) == pytest.approx((1.0, 1.0, 1.0))
    bottom = {d: 0.0 for d in ALL_DIMENSIONS}
    bottom.update(subject_consistency=0.1462, background_consistency=0.2615,
                  temporal_flickering=0.6293, motion_smoothness=0.706, appearance_style=0.0009)
    out = aggregate(bottom)
    assert (out["total"], out["quality"], out["semantic"]) == pytest.approx((0.0, 0.0, 0.0))


def test_no_clipping_outside_the_range():
    out = aggregate({"temporal_flickering": 0.5})
    assert out["quality"] == pytest.approx((0.5 - 0.6293) / (1 - 0.6293))
    assert out["quality"] < 0


def test_partial_quality_only_renormalises_weights():
    # aesthetic 0.5 (weight 1) and dynamic degree 1.0 (weight 0.5): (0.5 + 0.5) / 1.5
    out = aggregate({"aesthetic_quality": 0.5, "dynamic_degree": 1.0})
    assert out["quality"] == pytest.approx(1.0 / 1.5)
    assert out["semantic"] is None
    assert out["total"] == pytest.approx(1.0 / 1.5)  # the only group present
    assert out["partial"] is True
    assert len(out["missing"]) == 14 and "dynamic_degree" not in out["missing"]
    assert out["missing"][0] == "subject_consistency"  # leaderboard order


def test_partial_both_groups():
    out = aggregate({"temporal_flickering": 0.6293 + 0.3707 / 2, "scene": 0.8222 / 2,
                     "color": 0.9})
    assert out["quality"] == pytest.approx(0.5)
    assert out["semantic"] == pytest.approx((0.5 + 0.9) / 2)
    assert out["total"] == pytest.approx((4 * 0.5 + 0.7) / 5)
    assert out["partial"] is True


def test_semantic_only():
    out = aggregate({"color": 0.3})
    assert out["quality"] is None and out["semantic"] == pytest.approx(0.3)
    assert out["total"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"colour": 0.5}, "unknown dimensions"),
        ({}, "no dimension"),
        ({"color": math.nan}, "finite"),
        ({"color": True}, "finite number"),
        ({"color": "0.5"}, "finite number"),
    ],
)
def test_bad_input(raw, match):
    with pytest.raises(ValueError, match=match):
        aggregate(raw)
