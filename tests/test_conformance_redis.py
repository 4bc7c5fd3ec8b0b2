"""The storage conformance suite, run against a real redis-server per test."""

import pytest

from fleetkit.testing.conformance import StorageConformance, started_harness
from fleetkit.testing.redis_harness import RedisHarness, find_redis_binary


@pytest.fixture
async def harness():
    if find_redis_binary() is None:
        pytest.skip("redis-server not found; install redis or set FLEETKIT_REDIS_BINARY")
    async with started_harness(RedisHarness) as started:
        yield started


class TestRedisConformance(StorageConformance):
    pass
