"""`patchaudit similar` and `cluster` on small synthetic reports whose embeddings come in known groups."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from mining_fixtures import Synthetic, synthetic, write_report

from patchaudit.errors import MiningError
from patchaudit.mining import similar as sim
from patchaudit.mining.cluster import compute_clusters
from patchaudit.mining.reportio import open_report
from patchaudit.scheduler.cli import main
from patchaudit.store.embeddings import read_embeddings


@pytest.fixture()
def report(tmp_path):
    return write_report(str(tmp_path / "r"), Synthetic(400, seed=0, batch_size=64, dim=16, clusters=4))


def _adjusted_rand(a, b):
    from scipy.special import comb

    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    s = comb(table, 2).sum()
    sa, sb, n = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum(), comb(len(a), 2)
    exp = sa * sb / n
    return (s - exp) / (0.5 * (sa + sb) - exp)


def test_exact_index_matches_brute_force(report):
    rep = open_report(report)
    ri = sim.load_or_build(rep, "pooled")
    assert ri.exact and len(ri) == 400
    emb = read_embeddings(rep.store)
    q = emb.pooled[7].astype(np.float32)
    hits = sim.search([ri], q, k=10, exclude_uri=emb.uris[7])
    sims = emb.pooled.astype(np.float32) @ q / np.linalg.norm(q)
    sims[7] = -np.inf
    order = np.argsort(-sims)[:10]
    # ids compared within ties of the float16 scores; here the top 10 are distinct to 1e-4
    assert [h["image_uri"] for h in hits] == [emb.uris[i] for i in order]
    np.testing.assert_allclose([h["similarity"] for h in hits], sims[order], atol=1e-3)
    assert all(h["score"] is not None for h in hits)  # scores joined from the report


def test_index_cache_is_reused_and_rebuilt_when_batches_change(report, tmp_path):
    rep = open_report(report)
    sim.load_or_build(rep, "pooled")
    meta = json.loads(rep.store.read_bytes("mining/similar/pooled/index.json"))
    assert meta["vectors"] == 400
    write_report(str(tmp_path / "r"), Synthetic(500, seed=0, batch_size=64, dim=16, clusters=4))  # more batches
    ri = sim.load_or_build(open_report(report), "pooled")
    assert len(ri) == 500


def test_ivf_beyond_the_exact_size_finds_the_same_group(report):
    rep = open_report(report)
    ri = sim.load_or_build(rep, "peak", exact_max=100, cache=False)
    assert not ri.exact
    emb = read_embeddings(rep.store)
    idx = np.arange(400)
    groups = synthetic.cluster_of(idx, 4)
    q = emb.peak[0].astype(np.float32)
    hits = sim.search([ri], q, k=10, exclude_uri=emb.uris[0])
    pos = {u: i for i, u in enumerate(emb.uris)}
    assert np.mean([groups[pos[h["image_uri"]]] == groups[0] for h in hits]) >= 0.9


def test_two_reports_are_merged(tmp_path):
    a = write_report(str(tmp_path / "a"), Synthetic(100, dim=8, root="s3://archive/a"))
    b = write_report(str(tmp_path / "b"), Synthetic(100, dim=8, root="s3://archive/b", seed=3))
    reps = [open_report(a), open_report(b)]
    idx = [sim.load_or_build(r, "pooled") for r in reps]
    q = read_embeddings(reps[0].store).pooled[0]
    hits = sim.search(idx, q, k=20)
    assert {h["report"] for h in hits} == {reps[0].uri, reps[1].uri}
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)


def test_cli_similar_and_errors(report, tmp_path, capsys):
    uri = read_embeddings(open_report(report).store).uris[3]
    assert main(["similar", "--report", report, "--image", uri, "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2 + 5 and "archived image" in out
    other = write_report(str(tmp_path / "o"), Synthetic(20, dim=8, space="padim-other-space", root="s3://x"))
    assert main(["similar", "--report", report, "--report", other, "--image", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert "not comparable" in err and err.count("\n") == 0
    assert main(["similar", "--report", report, "--image", str(tmp_path / "missing.png")]) == 2
    assert "neither an image of the report" in capsys.readouterr().err
    assert main(["similar", "--report", str(tmp_path / "none"), "--image", uri]) == 2
    assert "no report at" in capsys.readouterr().err


def test_cluster_recovers_the_groups(report):
    res = compute_clusters(open_report(report), 4, flagged_only=False)
    uris = res.table["image_uri"].to_pylist()
    idx = np.array([int(u.rsplit("-", 1)[-1].split(".")[0]) for u in uris])
    assert _adjusted_rand(res.table["cluster"].to_numpy(), synthetic.cluster_of(idx, 4)) > 0.95
    sizes = [g["size"] for g in res.summary["groups"]]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == 400


def test_cluster_cli_writes_table_gallery_and_summary(report, capsys):
    assert main(["cluster", "--report", report, "--clusters", "3"]) == 0  # flagged images by default
    rep = open_report(report)
    table = pq.read_table(rep.store.uri_for("mining/clusters.parquet").removeprefix("file://"))
    assert table.num_rows > 0 and all(table["is_anomalous"].to_pylist())
    summary = json.loads(rep.store.read_bytes("mining/clusters.json"))
    assert summary["selection"] == "flagged" and summary["clusters"] == 3
    page = rep.store.read_bytes("mining/clusters.html").decode()
    assert page.count("Cluster ") >= 3 and 'src="../heatmaps/' in page  # relative links into the report
    review = rep.store.read_bytes("index.html").decode()  # the report's review page got a gallery section
    assert "Clusters of flagged images" in review and 'src="heatmaps/' in review and "Cluster 2:" in review
    assert main(["cluster", "--report", report, "--clusters", "100000"]) == 2
    assert "fewer than --clusters" in capsys.readouterr().err


def test_cluster_refuses_k_below_two(report):
    with pytest.raises(MiningError, match=">= 2"):
        compute_clusters(open_report(report), 1)
