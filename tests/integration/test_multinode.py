"""A real 2-node Ray cluster on loopback (`ray.cluster_utils.Cluster`: a head and one worker node,
one CPU each, every node bound to 127.0.0.1): a 2-shard model and 2 feature workers.

The index shards must land on different nodes (the run summary's `shards` records each one's node
id), feature workers must run on both nodes (one CPU per node leaves no other placement, and each
worker's counters carry its node id), and the scores must equal the single-process ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_dist import (
    LOOPBACK,
    alive,
    assert_exactly_once,
    assert_scores_match,
    bottle_test_images,
    fit_small,
    knn_threads,
    link_images,
    new_run_id,
    pid_of,
    redis_url,  # noqa: F401 (fixture)
    reference_scores,
    report_rows,
    run_config,
    run_ids,  # noqa: F401 (fixture)
    wait_until,
)

pytestmark = pytest.mark.integration

BATCH = 2


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("a Ray is already running in this process; this module starts its own cluster")
    node = {"num_cpus": 1, "node_ip_address": LOOPBACK, "object_store_memory": 128 << 20}
    c = Cluster(initialize_head=True, connect=True, head_node_args={**node, "include_dashboard": False})
    try:
        c.add_node(**node)
        c.wait_for_nodes()
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2, nodes
        assert {n["NodeManagerAddress"] for n in nodes} == {LOOPBACK}
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def test_shards_and_workers_spread_over_two_nodes(
    cluster,
    bottle_dir: Path,
    tmp_path: Path,
    redis_url,  # noqa: F811
    run_ids,
) -> None:  # noqa: F811
    import ray

    from patchaudit.scheduler.run import run_score

    model_uri = fit_small(bottle_dir, tmp_path / "model", n_train=20, image_size=(128, 128), shards=2)
    keys = link_images(bottle_test_images(bottle_dir, per_type=3), bottle_dir, tmp_path / "in")
    input_uri = f"file://{tmp_path / 'in'}"
    run_id = new_run_id("multinode")
    run_ids.append(run_id)
    config = run_config(redis_url, batch_size=BATCH, feature_workers=2, heatmaps=False)
    res = run_score(config, input_uri, model_uri, str(tmp_path / "report"), run_id=run_id, progress=False)

    rows = report_rows(str(tmp_path / "report"))
    assert_exactly_once(rows, [f"{input_uri}/{k}" for k in keys])
    assert_scores_match(
        rows, input_uri, reference_scores(model_uri, input_uri, keys, batch_size=BATCH, knn_threads=knn_threads(res))
    )

    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    shards = sorted(res["shards"], key=lambda s: s["shard"])
    assert [s["shard"] for s in shards] == [0, 1], shards
    assert {s["node"] for s in shards} == node_ids, f"both index shards on one node: {shards}"
    workers = res["workers"]
    assert len(workers) == 2, workers
    assert {w["node"] for w in workers} == node_ids, f"feature workers did not run on both nodes: {workers}"
    assert sum(w["batches"] for w in workers) == res["batches"] == len(keys) // BATCH
    assert {r["worker"] for r in rows} <= {w["worker"] for w in workers}
    # run_score stops the actors it started; wait for their processes to exit while the cluster is up
    # (a worker process still exiting when its raylet is shut down can be left behind as an orphan).
    pids = [pid_of(w["worker"]) for w in workers] + [s["pid"] for s in shards]
    wait_until(lambda: not any(alive(p) for p in pids), 60, f"the run's actor processes {pids} to exit")
