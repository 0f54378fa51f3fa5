"""scheduler.run.decoders_for and check_resources: how many decode actors a run starts, and the custom resources a run checks."""

from __future__ import annotations

import dataclasses

import pytest

from patchaudit.scheduler.config import RunConfig
from patchaudit.scheduler.plan import RunError
from patchaudit.scheduler.run import check_resources, decoders_for


def rc(**kw) -> RunConfig:
    return dataclasses.replace(RunConfig(), **kw).validate()


def test_worker_mode_starts_none() -> None:
    assert decoders_for(rc(), {"CPU": 64.0}, 1.0) == 0


def test_cluster_mode_takes_the_cpus_the_workers_leave() -> None:
    assert decoders_for(rc(decode="cluster"), {"CPU": 16.0}, 1.0) == 15
    assert decoders_for(rc(decode="cluster", decode_actor_cpus=2.0), {"CPU": 16.0}, 1.0) == 7
    assert decoders_for(rc(decode="cluster"), {"CPU": 1.0}, 1.0) == 1  # at least one
    assert decoders_for(rc(decode="cluster", decode_actors=3), {"CPU": 64.0}, 1.0) == 3
    # capped by the units of the decode resource
    res = {"CPU": 48.0, "decode": 8.0}
    assert decoders_for(rc(decode="cluster", decode_resource="decode"), res, 4.0) == 8


def test_a_resource_no_node_offers_is_an_error_that_names_the_offered_ones() -> None:
    with pytest.raises(RunError, match="'decode'.*offered: features"):
        check_resources(rc(decode="cluster", decode_resource="decode"), {"CPU": 4.0, "features": 1.0})
    with pytest.raises(RunError, match="worker_resource"):
        check_resources(rc(decode="cluster", worker_resource="gpu-box"), {"CPU": 4.0})
    # in worker mode the decode resource is not needed; the workers' and index shards' are
    check_resources(rc(decode_resource="decode"), {"CPU": 4.0})
    with pytest.raises(RunError, match="index_resource.*offered: features"):
        check_resources(rc(index_resource="index"), {"CPU": 4.0, "features": 1.0})
    check_resources(rc(index_resource="index"), {"CPU": 4.0, "index": 1.0})


def test_bad_values_are_config_errors() -> None:
    from patchaudit.errors import ConfigError

    with pytest.raises(ConfigError, match="decode"):
        rc(decode="gpu")
    with pytest.raises(ConfigError, match="decode_in_flight"):
        rc(decode_in_flight=0)
