"""Redis URLs are printed without their passwords; Redis errors become one line that says what to check."""

from __future__ import annotations

import pytest
import redis

from patchaudit.queue.connection import connect, describe_redis_error, redact_text, redact_url


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://alice:s3cret@host:6379", "redis://alice:***@host:6379"),
        ("rediss://alice:p%40ss@host/1", "rediss://alice:***@host/1"),
        ("redis://host:6379/0?password=s3cret&protocol=3", "redis://host:6379/0?password=***&protocol=3"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///run/redis.sock?password=s3cret", "unix:///run/redis.sock?password=***"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_unparsable_port_still_hides_the_password() -> None:
    out = redact_url("redis://:s3cret@host:notaport/0")
    assert "s3cret" not in out and "***" in out


def test_redact_text_masks_urls_and_named_secrets() -> None:
    text = "tried redis://u:pw1@a:1/0 and redis://:pw2@b:2, key AKIA123 secret abc/def"
    out = redact_text(text, ("abc/def",))
    assert "pw1" not in out and "pw2" not in out and "abc/def" not in out
    assert "redis://u:***@a:1/0" in out and "redis://:***@b:2" in out


@pytest.mark.parametrize(
    "exc, url, words",
    [
        (
            redis.AuthenticationError("invalid username-password pair or user is disabled."),
            "redis://:s3cret@h:1/0",
            ["refused the credentials", "redis://:***@h:1/0"],
        ),
        (
            redis.AuthenticationError("HELLO must be called with the client already authenticated, otherwise ..."),
            "redis://h:1/0",
            ["requires a password", "the URL gives none"],
        ),
        (
            redis.ConnectionError("Error 111 connecting to h:1. Connection refused."),
            "redis://:s3cret@h:1/0",
            ["cannot reach Redis at redis://:***@h:1/0", "Connection refused"],
        ),
        (
            redis.ConnectionError("Protocol Error: H, b'TTP/1.1 400 Bad Request'"),
            "redis://h:1/0",
            ["does not speak the Redis protocol"],
        ),
        (redis.TimeoutError("Timeout reading from socket"), "redis://h:1", ["did not answer in time"]),
        (redis.ResponseError("NOGROUP No such key"), "redis://h:1", ["answered with an error", "NOGROUP"]),
    ],
)
def test_describe_redis_error_is_one_clear_line(exc: Exception, url: str, words: list[str]) -> None:
    line = describe_redis_error(exc, url)
    assert "\n" not in line and "s3cret" not in line
    for w in words:
        assert w in line, line


def test_describe_redis_error_hides_a_password_echoed_by_the_error() -> None:
    line = describe_redis_error(redis.ConnectionError("cannot connect with s3cret"), "redis://:s3cret@h:1/0")
    assert "s3cret" not in line


def test_connect_gives_up_at_once_on_a_wrong_password(monkeypatch) -> None:
    """Authentication errors subclass ConnectionError; they must not be retried with backoff."""
    calls = []

    def fake_connect(self):  # type: ignore[no-untyped-def]
        calls.append(1)
        raise redis.AuthenticationError("invalid username-password pair")

    monkeypatch.setattr(redis.connection.AbstractConnection, "_connect", fake_connect, raising=False)
    monkeypatch.setattr(redis.connection.Connection, "_connect", fake_connect)
    client = connect("redis://:wrong@127.0.0.1:1/0")
    with pytest.raises(redis.AuthenticationError):
        client.ping()
    assert len(calls) == 1


def test_connect_retries_a_lost_connection_a_bounded_number_of_times(monkeypatch) -> None:
    calls = []

    def fake_connect(self):  # type: ignore[no-untyped-def]
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(redis.connection.Connection, "_connect", fake_connect)
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setattr("redis.retry.sleep", lambda s: None, raising=False)
    client = connect("redis://127.0.0.1:1/0", retries=3)
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert 2 <= len(calls) <= 4 * 3  # retried, and bounded (redis-py may connect twice per try)
