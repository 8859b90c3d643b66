"""A Redis URL as the gateway writes it in a line or /health: its password masked, the rest kept."""

from __future__ import annotations

from proxy.settings import masked_redis_url as masked


def test_a_password_in_the_url_is_masked() -> None:
    assert masked("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert masked("redis://app:s3cret@cache:6379") == "redis://app:***@cache:6379"
    assert masked("redis://cache:6379") == "redis://cache:6379"
    assert (
        masked("unix:///run/redis.sock?db=1&password=s3cret")
        == "unix:///run/redis.sock?db=1&password=***"
    )
