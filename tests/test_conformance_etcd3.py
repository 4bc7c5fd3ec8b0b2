"""The storage conformance suite against a real etcd, one server per test."""

from __future__ import annotations

import pytest

from fleetkit.testing.conformance import StorageConformance, started_harness
from fleetkit.testing.etcd import ETCD_BINARY_ENV, find_etcd_binary
from fleetkit.testing.etcd3_harness import Etcd3Harness


@pytest.fixture
async def harness():
    if find_etcd_binary() is None:
        pytest.skip(f"etcd executable not found; install etcd or set {ETCD_BINARY_ENV}")
    async with started_harness(Etcd3Harness) as running:
        yield running


class TestEtcd3Conformance(StorageConformance):
    pass
