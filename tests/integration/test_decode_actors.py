"""Decode actors and the feature worker's bounded client for them (workers/decode_actors.py), on a local Ray.

- Requests beyond `max_in_flight` wait in the client: however far ahead a worker asks, the decoded
  batches at the actors or waiting to be scored never exceed the bound, and the object store holds
  no more than those at every checkpoint of a long stream of batches (no growth).
- A decode actor killed while it decodes loses nothing: the request is redone on another actor (or on
  the restarted one), and the pixels are those of the worker's own decode.
- With every actor gone for good, the worker decodes the batch itself.
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures_dist import wait_until
from PIL import Image

pytestmark = pytest.mark.integration

SIZE = (192, 192)  # a request of 2 images is 221 KB: Ray keeps it in the object store, not inline


def _write_pngs(root: Path, n: int, side: int) -> list[str]:
    keys = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        key = f"img/{i:03d}.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(buf.getvalue())
        keys.append(key)
    keys.append("img/missing.png")  # an error travels as text, like in the worker
    return keys


def _actors(root: Path, n: int) -> list[Any]:
    import ray

    from patchaudit.workers.decode_actors import DecodeActor

    handles = [
        DecodeActor.options(num_cpus=0, max_restarts=-1, max_concurrency=2).remote(f"file://{root}", 1)
        for _ in range(n)
    ]
    ray.get([h.info.remote() for h in handles])
    return handles


def _local(root: Path, prep: Any) -> Any:
    from patchaudit.store.objects import open_store
    from patchaudit.workers.pipeline import decode_many

    store = open_store(f"file://{root}")
    return lambda keys: list(decode_many(store.read_bytes, keys, prep, 1))


def _same(got: list[Any], want: list[Any]) -> None:
    assert [g.key for g in got] == [w.key for w in want]
    for g, w in zip(got, want):
        assert g.error == w.error
        if w.image is not None:
            assert g.image.original_size == w.image.original_size
            np.testing.assert_array_equal(g.image.pixels, w.image.pixels)


def _plasma_bytes() -> int:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)  # ours: other Rays may run here
    return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


def test_in_flight_is_bounded_and_memory_stays_flat(ray_local, tmp_path: Path) -> None:
    from patchaudit.workers.decode import Preprocess
    from patchaudit.workers.decode_actors import DecodeClient

    keys = _write_pngs(tmp_path, 8, 256)
    prep = Preprocess(SIZE)
    local = _local(tmp_path, prep)
    bound = 3
    client = DecodeClient(_actors(tmp_path, 2), prep, bound, local=local)
    batch_bytes = 2 * SIZE[0] * SIZE[1] * 3
    # A long run: 150 requests (33 MB decoded) asked for at once, taken one by one by a slow consumer.
    n = 150
    chunks = [[keys[(2 * i) % 8], keys[(2 * i + 1) % 8]] for i in range(n - 1)] + [[keys[0], keys[-1]]]
    tickets = [client.submit(c) for c in chunks]
    assert client.in_flight == bound
    held = bound * (batch_bytes + 4096)  # the requests out, with their objects' metadata
    checkpoints = []
    for i, (t, c) in enumerate(zip(tickets, chunks)):
        got = client.result(t)
        if i % 10 == 0 or i == n - 1:
            _same(got, local(c))
        assert client.in_flight <= bound
        time.sleep(0.02)  # the consumer is the slow side: the actors would race ahead without the bound
        if i % 50 == 49:
            # Ray frees taken objects in batches (about once a second, later under load): once it has,
            # the store holds only what is out; with a leak it would hold everything taken so far.
            del got
            checkpoints.append(wait_until(lambda: (u := _plasma_bytes()) <= held and [u], 60, f"the store at {i}"))
    assert len(checkpoints) == 3
    assert client.stats["peak_in_flight"] == bound
    assert client.stats["requests"] == n and client.stats["retries"] == 0
    assert client.in_flight == 0
    wait_until(lambda: _plasma_bytes() == 0, 60, "the object store to be empty after the last batch")


def test_an_actor_killed_while_decoding_loses_nothing(ray_local, tmp_path: Path) -> None:
    import ray

    from patchaudit.workers.decode import Preprocess
    from patchaudit.workers.decode_actors import DecodeClient

    keys = _write_pngs(tmp_path, 6, 1500)  # large enough that a decode takes a while
    prep = Preprocess(SIZE)
    local = _local(tmp_path, prep)
    actors = _actors(tmp_path, 2)
    client = DecodeClient(actors, prep, 2, local=local)
    for _ in range(5):
        t = client.submit(keys)
        victim = actors[t.actor]
        info = wait_until(
            lambda v=victim: (i := ray.get(v.info.remote()))["busy"] and i,
            60,
            "the actor to be decoding",
            every_s=0.005,
        )
        # Stopped, then checked: a fast machine may have finished the request between the two calls.
        os.kill(info["pid"], signal.SIGSTOP)
        if not ray.wait([t.ref], timeout=0.2)[0]:
            break
        os.kill(info["pid"], signal.SIGCONT)
        client.result(t)
    else:
        pytest.fail("every request finished before its actor could be stopped mid-decode")
    os.kill(info["pid"], signal.SIGKILL)  # mid-decode: its result is lost
    got = client.result(t)
    _same(got, local(keys))
    assert client.stats["retries"] >= 1 and client.stats["local_decodes"] == 0

    # Ray restarts it (max_restarts=-1): the client keeps using both actors.
    def restarted() -> Any:
        try:
            return ray.get(victim.info.remote(), timeout=10)
        except ray.exceptions.RayActorError:  # still restarting
            return None

    assert wait_until(restarted, 60, "the actor to be restarted")["pid"] != info["pid"]
    _same(client.result(client.submit(keys[:2])), local(keys[:2]))


def test_with_every_actor_gone_the_worker_decodes_itself(ray_local, tmp_path: Path) -> None:
    import ray

    from patchaudit.workers.decode import Preprocess
    from patchaudit.workers.decode_actors import DecodeClient

    keys = _write_pngs(tmp_path, 3, 64)
    prep = Preprocess(SIZE)
    local = _local(tmp_path, prep)
    actors = _actors(tmp_path, 2)
    for h in actors:
        ray.kill(h, no_restart=True)
    client = DecodeClient(actors, prep, 2, local=local, retries=3)
    got = client.result(client.submit(keys))
    _same(got, local(keys))
    assert client.stats["local_decodes"] == 1 and client.stats["retries"] == 3
    assert client.in_flight == 0
