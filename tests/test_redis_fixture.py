"""The Redis fixture hands out a private, memory-only server that can be restarted in place."""

import redis

from tests.services import RedisServer


def test_redis_server_is_private_and_restart_loses_data(redis_server: RedisServer,
                                                        redis_url: str) -> None:
    assert redis_url == redis_server.url
    assert redis_server.port != 6379
    client = redis.Redis.from_url(redis_url)
    client.set("probe", b"queued task")
    assert client.get("probe") == b"queued task"
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("appendonly") == {"appendonly": "no"}
    assert client.config_get("bind")["bind"] == "127.0.0.1"

    restarts = redis_server.restarts
    redis_server.restart()
    assert redis_server.url == redis_url  # same port: clients reconnect to the same address
    assert redis_server.restarts == restarts + 1
    assert redis.Redis.from_url(redis_url).get("probe") is None  # no persistence

    redis_server.stop()
    assert not redis_server.running
    redis_server.ensure_running()
    assert redis.Redis.from_url(redis_url).ping()
