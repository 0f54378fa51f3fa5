"""Cross-fitted thresholds: folds, the conformal order statistic, its interval, and out-of-sample scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchaudit.errors import ConfigError
from patchaudit.workers.calibration import (
    batches_of,
    clopper_pearson,
    conformal_threshold,
    cross_fit_scores,
    fold_ids,
    split_images,
    summarize,
)


def test_fold_ids_are_balanced_seeded_and_cover_every_item():
    f = fold_ids(23, 5, seed=0)
    assert sorted(np.bincount(f).tolist()) == [4, 4, 5, 5, 5]
    assert np.array_equal(f, fold_ids(23, 5, seed=0)) and not np.array_equal(f, fold_ids(23, 5, seed=1))
    assert sorted(fold_ids(3, 5, seed=0).tolist()) == [0, 1, 2]  # fewer images than folds: leave one out
    with pytest.raises(ConfigError, match="at least 2"):
        fold_ids(1, 5, seed=0)


def test_conformal_threshold_is_the_order_statistic():
    s = np.arange(1, 200)[::-1].astype(float)  # 199 distinct scores 1..199, unsorted
    t, ok = conformal_threshold(s, 0.01)  # rank ceil(200 * 0.99) = 198
    assert ok and t == 198.0 and (s >= t).mean() == pytest.approx(2 / 199)
    t, ok = conformal_threshold(s, 0.05)  # rank ceil(200 * 0.95) = 190
    assert ok and t == 190.0
    t, ok = conformal_threshold(np.arange(20.0), 0.01)  # 20 images cannot vouch for 1%: the maximum, flagged
    assert t == 19.0 and not ok


def test_clopper_pearson_brackets_the_rate():
    lo, hi = clopper_pearson(2, 200)
    assert 0.0 < lo < 0.01 < hi < 0.04
    assert clopper_pearson(0, 50)[0] == 0.0 and clopper_pearson(50, 50)[1] == 1.0
    rec = summarize(np.arange(100.0), 95.0, 0.05, 5, 1.0, True)
    assert rec["estimated_fpr"] == 0.05 and rec["estimated_fpr_ci95"][0] < 0.05 < rec["estimated_fpr_ci95"][1]


def test_split_and_join_round_trip_tensors_and_lists():
    a = torch.arange(24.0).view(4, 2, 3)
    items = split_images(a)
    assert len(items) == 4 and items[0].shape == (1, 2, 3)
    assert torch.equal(torch.cat(list(batches_of(items, 3, torch.device("cpu")))), a)
    multi = [a, a[:, :1] * 2]
    items = split_images(multi)
    out = list(batches_of(items, 4, torch.device("cpu")))
    assert len(out) == 1 and torch.equal(out[0][0], a) and torch.equal(out[0][1], multi[1])


class _MeanModel:
    """Scores an image by its distance to the mean of the images it was fitted on."""

    device = torch.device("cpu")

    def fit_embedded(self, embeddings):
        self.mean = torch.cat(list(embeddings)).mean(0)

    def score_embeddings(self, emb):
        class R:
            image_scores = (emb - self.mean).abs().sum(dim=(1,)).numpy()

        return R()


def test_cross_fit_scores_are_out_of_sample():
    """An outlier's score comes from a model that never saw it: larger than an in-sample score would be."""
    x = torch.zeros(10, 1)
    x[3] = 10.0
    items = split_images(x)
    folds = fold_ids(10, 5, seed=0)
    oos = cross_fit_scores(_MeanModel, items, folds, batch_size=4)
    assert np.isfinite(oos).all()
    others = x[torch.from_numpy(folds != folds[3])]
    assert oos[3] == pytest.approx(10.0 - float(others.mean()))  # mean of the other folds only
    assert oos[3] > 10.0 - float(x.mean())  # the in-sample score, diluted by the outlier itself


def test_concurrent_cross_fit_gives_the_sequential_scores_and_runs_the_final_fit():
    x = torch.arange(20, dtype=torch.float32).view(20, 1) ** 1.5
    items = split_images(x)
    folds = fold_ids(20, 5, seed=0)
    ran: list[str] = []
    seq = cross_fit_scores(_MeanModel, items, folds, batch_size=4, alongside=lambda: ran.append("seq"))
    par = cross_fit_scores(_MeanModel, items, folds, batch_size=4, concurrent=3, alongside=lambda: ran.append("par"))
    np.testing.assert_array_equal(seq, par)
    assert ran == ["seq", "par"]


def test_concurrent_fits_auto_only_for_single_threaded_fits():
    from patchaudit.workers.fit import concurrent_fits

    assert concurrent_fits(0, None, 6) == 1  # the fit uses every core itself
    assert concurrent_fits(3, None, 6) == 3  # asked for
    assert concurrent_fits(9, None, 6) == 6  # never more than there are fits
    auto = concurrent_fits(0, 1, 6)
    assert 1 <= auto <= 6
