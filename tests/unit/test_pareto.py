"""Pareto marking and the recommendation rule on hand-made tables."""

from __future__ import annotations

import itertools
import random

import pytest

from patchaudit.bench.pareto import ParetoError, pareto_mask, recommend

OBJ = [("acc", "max"), ("ips", "max"), ("mb", "min")]

# name, accuracy, images/s, model MB, expected optimal, why
TABLE = [
    ("A", 0.99, 10.0, 50.0, True, "most accurate"),
    ("B", 0.985, 20.0, 50.0, True, "faster than A, a bit less accurate"),
    ("C", 0.97, 15.0, 60.0, False, "B is better on all three"),
    ("D", 0.95, 30.0, 5.0, True, "fastest and smallest"),
    ("E", 0.95, 30.0, 5.0, True, "equal to D: equal rows do not dominate each other"),
    ("F", None, 99.0, 1.0, False, "no accuracy (e.g. no pixel metrics): not comparable"),
    ("G", 0.99, 10.0, 51.0, False, "as A but larger"),
    ("H", 0.90, 25.0, 100.0, False, "D is better on all three"),
    ("I", 0.93, 40.0, 500.0, True, "the fastest of all, though huge"),
]


def rows():
    return [{"name": n, "acc": a, "ips": s, "mb": m} for n, a, s, m, _, _ in TABLE]


def test_hand_made_table():
    got = pareto_mask(rows(), OBJ)
    want = [t[4] for t in TABLE]
    assert got == want, [(t[0], g, t[5]) for t, g in zip(TABLE, got) if g != t[4]]


def test_direction_matters():
    # minimising accuracy instead flips who wins on that axis
    r = [{"acc": 0.9, "ips": 1.0, "mb": 1.0}, {"acc": 0.8, "ips": 1.0, "mb": 1.0}]
    assert pareto_mask(r, OBJ) == [True, False]
    assert pareto_mask(r, [("acc", "min"), ("ips", "max"), ("mb", "min")]) == [False, True]


def test_nan_is_missing():
    r = [{"acc": float("nan"), "ips": 100.0, "mb": 1.0}, {"acc": 0.5, "ips": 1.0, "mb": 9.0}]
    assert pareto_mask(r, OBJ) == [False, True]


def test_every_dominated_row_is_dominated_by_an_optimal_one():
    rnd = random.Random(0)
    r = [
        {"acc": rnd.choice([0.8, 0.9, 1.0]), "ips": rnd.choice([1.0, 2.0, 3.0]), "mb": rnd.choice([1.0, 2.0])}
        for _ in range(40)
    ]
    mask = pareto_mask(r, OBJ)
    assert any(mask) and not all(mask)

    def dominates(a, b):
        ge = a["acc"] >= b["acc"] and a["ips"] >= b["ips"] and a["mb"] <= b["mb"]
        return ge and (a["acc"] > b["acc"] or a["ips"] > b["ips"] or a["mb"] < b["mb"])

    for i, j in itertools.permutations(range(len(r)), 2):
        if mask[i] and mask[j]:
            assert not dominates(r[i], r[j])
    for i, ok in enumerate(mask):
        if not ok:
            assert any(mask[j] and dominates(r[j], r[i]) for j in range(len(r)))


@pytest.mark.parametrize(
    "tolerance, expected, phrase",
    [
        (0.0, "A", "the most accurate"),
        (0.01, "B", "fastest of the 2"),  # A and B within 0.01 of 0.99; B is faster
        (0.05, "D", "fastest of the 4"),  # D/E tie on everything (first wins); I at 0.93 is too far
        (0.1, "I", "fastest of the 5"),
    ],
)
def test_recommend_fastest_within_tolerance(tolerance, expected, phrase):
    r = rows()
    pick = recommend(r, pareto_mask(r, OBJ), "acc", "ips", "mb", tolerance)
    assert pick is not None
    assert r[pick.index]["name"] == expected
    assert phrase in pick.reason


def test_recommend_reason_uses_display_names():
    r = rows()
    pick = recommend(r, pareto_mask(r, OBJ), "acc", "ips", "mb", 0.01, {"ips": "images/s", "mb": "MB"})
    assert pick.reason.startswith("acc 0.9850, 20 images/s, 50 MB: 0.0050 below the best acc 0.9900")


def test_recommend_speed_tie_goes_to_smaller_model():
    r = [{"acc": 0.9, "ips": 5.0, "mb": 10.0}, {"acc": 0.9, "ips": 5.0, "mb": 3.0}, {"acc": 0.95, "ips": 1, "mb": 1}]
    pick = recommend(r, [True, True, True], "acc", "ips", "mb", 0.1)
    assert pick.index == 1


def test_recommend_none_when_nothing_is_optimal():
    r = [{"acc": None, "ips": 1.0, "mb": 1.0}]
    assert recommend(r, pareto_mask(r, OBJ), "acc", "ips", "mb") is None


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pareto_mask(rows(), [("acc", "up")]), "direction"),
        (lambda: pareto_mask(rows(), []), "at least one objective"),
        (lambda: pareto_mask([{"acc": "0.9", "ips": 1.0, "mb": 1.0}], OBJ), "row #0: acc must be a number"),
        (lambda: recommend(rows(), [True], "acc", "ips", "mb"), "Pareto flags"),
        (lambda: recommend(rows(), [False] * len(TABLE), "acc", "ips", "mb", -1), "tolerance"),
    ],
)
def test_errors_say_what_is_wrong(call, match):
    with pytest.raises(ParetoError, match=match):
        call()
