"""Nested selection for `bench`: choose on one part of the labelled test images, report on another.

Picking the most accurate configuration on the same images whose numbers are then shown is the
optimistic selection the field warns about (like choosing a checkpoint on the test set). So the test
split is cut, seeded and stratified by defect type ("good" is a stratum too), into a *selection* part,
on which configurations are ranked and one is recommended, and a *report* part, whose numbers are the
ones shown for the recommendation. Full-split numbers stay available for comparison with published
tables, labelled as such.

The cut depends only on the image keys, their strata, the fraction and the seed, never on the order of
the listing or on scores, so every configuration of a bench sees the same parts.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from patchaudit.errors import ConfigError

SELECTION = "selection"
REPORT = "report"
DEFAULT_FRACTION = 0.5
PART_METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1", "precision", "recall", "n_images", "n_good", "n_anomalous")


def check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
        raise ConfigError(f"selection fraction must be in [0, 1) (0 = no nested selection), got {fraction!r}")
    return float(fraction)


def split_parts(keys: Sequence[str], strata: Sequence[str], fraction: float, seed: int) -> list[str]:
    """SELECTION or REPORT for each image, stratified by `strata` (e.g. the defect type).

    Within a stratum images are ordered by a seeded hash of their key and the first
    round(n * fraction) go to the selection part; a stratum of two or more images always puts at
    least one image in each part, so both parts see every defect type that can be split.
    """
    check_fraction(fraction)
    if len(keys) != len(strata):
        raise ValueError(f"{len(keys)} keys but {len(strata)} strata")
    if len(set(keys)) != len(keys):
        raise ValueError("image keys must be unique")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        groups[s].append(i)
    parts = [REPORT] * len(keys)
    if fraction == 0.0:
        return parts
    for members in groups.values():
        order = sorted(members, key=lambda i: hashlib.sha256(f"{seed}\0{keys[i]}".encode()).digest())
        n = len(order)
        n_sel = round(n * fraction)
        if n >= 2:
            n_sel = min(max(n_sel, 1), n - 1)
        for i in order[:n_sel]:
            parts[i] = SELECTION
    return parts


def part_metrics(ev: dict[str, Any]) -> dict[str, Any]:
    """The metrics kept per part (the subset of `metrics.evaluate`'s output the bench shows)."""
    return {k: ev.get(k) for k in PART_METRICS}


def accuracy(image_auroc: float | None, aupro: float | None) -> float | None:
    """(image AUROC + AUPRO) / 2, or None without a map (see runner.ACCURACY_DEFINITION)."""
    if image_auroc is None or aupro is None:
        return None
    return (image_auroc + aupro) / 2
