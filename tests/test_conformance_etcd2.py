"""The storage conformance suite against etcd's v2 API, one server per test."""

from __future__ import annotations

import pytest

from fleetkit.testing.conformance import StorageConformance, started_harness
from fleetkit.testing.etcd import ETCD_BINARY_ENV, find_etcd_binary
from fleetkit.testing.etcd2_harness import Etcd2Harness


@pytest.fixture
async def harness():
    if find_etcd_binary() is None:
        pytest.skip(f"etcd executable not found; install etcd or set {ETCD_BINARY_ENV}")
    async with started_harness(Etcd2Harness) as running:
        yield running


class TestEtcd2Conformance(StorageConformance):
    pass
