"""Shared fixtures: real etcd servers, real systemd user managers and fleetkit clusters."""

from __future__ import annotations

import contextlib
import importlib
import shutil
import tempfile
from pathlib import Path

import pytest

from fleetkit.testing.cluster import TestCluster, storage_section
from fleetkit.testing.conformance import started_harness

HARNESSES = {
    "etcd3": "fleetkit.testing.etcd3_harness:Etcd3Harness",
    "etcd2": "fleetkit.testing.etcd2_harness:Etcd2Harness",
    "redis": "fleetkit.testing.redis_harness:RedisHarness",
    "embedded": "fleetkit.testing.embedded_harness:EmbeddedHarness",
}


def harness_class(backend: str):
    module_name, _, class_name = HARNESSES[backend].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


pytest_plugins = ["fleetkit.testing.etcd", "fleetkit.testing.systemd"]


@pytest.fixture
async def cluster_factory(etcd_factory):
    """Yield ``make(nodes={name: metadata})``, which starts etcd and a cluster; all stop at teardown."""
    clusters: list[TestCluster] = []
    # Short path: unix socket addresses are limited to 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="fk-c-"))

    async def make(nodes: dict[str, dict[str, str]], **node_options) -> TestCluster:
        etcd = etcd_factory()
        cluster = TestCluster(directory / f"c{len(clusters)}", etcd.client_url)
        cluster.etcd = etcd
        clusters.append(cluster)
        for name, metadata in nodes.items():
            await cluster.add_node(name, metadata, **node_options)
        await cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            await cluster.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def store_factory():
    """Yield ``start(backend)``, which starts a real store and returns its harness; all stop at teardown."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(backend: str):
            return await stack.enter_async_context(started_harness(harness_class(backend)))

        yield start


@pytest.fixture
async def backend_cluster_factory(store_factory):
    """Yield ``make(backend, nodes)``: a cluster on a fresh store of `backend`; all stop at teardown."""
    clusters: list[TestCluster] = []
    directory = Path(tempfile.mkdtemp(prefix="fk-b-"))

    async def make(backend: str, nodes: dict[str, dict[str, str]], **node_options) -> TestCluster:
        harness = await store_factory(backend)
        config = harness.storage_config("/fleetkit/")
        cluster = TestCluster(
            directory / f"c{len(clusters)}", storage_section=storage_section(config),
            storage_factory=lambda: harness.new_storage("/fleetkit/"),
        )
        cluster.harness = harness
        clusters.append(cluster)
        for name, metadata in nodes.items():
            await cluster.add_node(name, metadata, **node_options)
        await cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            await cluster.close()
        shutil.rmtree(directory, ignore_errors=True)
