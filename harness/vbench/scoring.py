"""VBench leaderboard scores from raw dimension scores.

Each raw score (VBench's own per-dimension result, a fraction) is normalised with the leaderboard's
fixed range and weight, without clipping:

    normalized_k = (raw_k - Min_k) / (Max_k - Min_k) * w_k      (w = 1, dynamic_degree 0.5)

    Quality  = sum of normalized_k over the 7 quality dimensions / sum of their w_k  (= 6.5)
    Semantic = sum of normalized_k over the 9 semantic dimensions / 9
    Total    = (4 * Quality + Semantic) / 5

With dimensions missing, every average runs over what is present: the quality normaliser is the
sum of the weights of the quality dimensions present (so a present set scores the same as it would
among the full set if the absent ones had the same mean), Semantic is the mean of the semantic
dimensions present, and Total re-normalises the 4:1 group weights over the groups present (a group
with no dimension is ``None`` and Total equals the other group). Such a result is ``partial``.
All scores are fractions (the leaderboard prints them x100).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

QUALITY_DIMENSIONS = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "aesthetic_quality",
    "imaging_quality",
    "dynamic_degree",
)
SEMANTIC_DIMENSIONS = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "appearance_style",
    "temporal_style",
    "overall_consistency",
)
ALL_DIMENSIONS = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS

# (Min, Max) of the leaderboard normalisation; dimensions not listed use (0, 1)
NORMALIZATION_RANGE = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
DIMENSION_WEIGHT = {"dynamic_degree": 0.5}  # others 1
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0


def weight(dimension: str) -> float:
    return DIMENSION_WEIGHT.get(dimension, 1.0)


def normalize(dimension: str, raw: float) -> float:
    """The weighted, range-normalised score of one dimension (not clipped)."""
    if dimension not in ALL_DIMENSIONS:
        raise ValueError(f"dimension: got {dimension!r}, expected one of {list(ALL_DIMENSIONS)}")
    low, high = NORMALIZATION_RANGE.get(dimension, (0.0, 1.0))
    return (raw - low) / (high - low) * weight(dimension)


def aggregate(raw: Mapping[str, float]) -> dict:
    """Total / Quality / Semantic from raw scores keyed by VBench dimension name.

    Returns ``{"total", "quality", "semantic", "partial", "missing", "normalized"}``: the three
    scores as fractions (``None`` for a group with no dimension present), ``partial`` True unless
    all 16 dimensions are present, ``missing`` the absent dimensions in leaderboard order and
    ``normalized`` the per-dimension normalised (and weighted) scores.
    """
    unknown = sorted(set(raw) - set(ALL_DIMENSIONS))
    if unknown:
        raise ValueError(
            f"raw: unknown dimensions {unknown}, expected names from {list(ALL_DIMENSIONS)}"
        )
    if not raw:
        raise ValueError("raw: got no dimension scores, expected at least one")
    normalized = {}
    for name in ALL_DIMENSIONS:
        if name in raw:
            value = raw[name]
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not numeric or not math.isfinite(value):
                raise ValueError(f"raw[{name!r}]: got {value!r}, expected a finite number")
            normalized[name] = normalize(name, float(value))

    quality_present = [d for d in QUALITY_DIMENSIONS if d in normalized]
    semantic_present = [d for d in SEMANTIC_DIMENSIONS if d in normalized]
    quality = (
        sum(normalized[d] for d in quality_present) / sum(weight(d) for d in quality_present)
        if quality_present else None
    )
    semantic = (
        sum(normalized[d] for d in semantic_present) / len(semantic_present)
        if semantic_present else None
    )
    groups = [(QUALITY_WEIGHT, quality), (SEMANTIC_WEIGHT, semantic)]
    present = [(w, s) for w, s in groups if s is not None]
    total = sum(w * s for w, s in present) / sum(w for w, _ in present)
    missing = [d for d in ALL_DIMENSIONS if d not in normalized]
    return {
        "total": total,
        "quality": quality,
        "semantic": semantic,
        "partial": bool(missing),
        "missing": missing,
        "normalized": normalized,
    }
