"""Queue options: validation and the backoff schedule (no Redis needed)."""

from __future__ import annotations

import pytest

from patchaudit.errors import ConfigError
from patchaudit.queue.messages import MessageError
from patchaudit.queue.streams import QueueOptions, RunKeys


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"idle_ms": 0}, "idle_ms must be an integer >= 1"),
        ({"max_attempts": 1.5}, "max_attempts must be an integer"),
        ({"block_ms": -1}, "block_ms must be"),
        ({"backoff_s": -1}, "backoff_s must be seconds"),
    ],
)
def test_bad_options_are_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QueueOptions(**kwargs)


def test_backoff_doubles_and_is_capped() -> None:
    o = QueueOptions(backoff_s=1.0, backoff_max_s=5.0)
    assert [o.delay_s(n) for n in (1, 2, 3, 4, 100)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_run_keys_are_namespaced_by_run() -> None:
    k = RunKeys.of("r42")
    assert k.stream == "patchaudit:r42:batches" and k.dead == "patchaudit:r42:dead"
    assert k.done == "patchaudit:r42:done" and len(set(k.all())) == 6
    with pytest.raises(MessageError, match="run_id must be"):
        RunKeys.of("r*")  # would make every key a glob
