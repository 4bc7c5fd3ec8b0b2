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


@contextlib.asynccontextmanager
async def cluster_maker(prefix: str):
    """Yield ``make(cluster, nodes, **options)``, which adds and starts the nodes; every cluster closes on exit."""
    clusters: list[TestCluster] = []
    # Short path: unix socket addresses are limited to 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix=prefix))

    async def make(build, nodes: dict[str, dict[str, str]], **node_options) -> TestCluster:
        cluster = build(directory / f"c{len(clusters)}")
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
async def cluster_factory(etcd_factory):
    """Yield ``make(nodes={name: metadata})``, which starts etcd and a cluster on it; all stop at teardown."""
    async with cluster_maker("fk-c-") as make_cluster:
        async def make(nodes: dict[str, dict[str, str]], **node_options) -> TestCluster:
            etcd = etcd_factory()

            def build(directory: Path) -> TestCluster:
                cluster = TestCluster(directory, etcd.client_url)
                cluster.etcd = etcd
                return cluster

            return await make_cluster(build, nodes, **node_options)

        yield make


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
    async with cluster_maker("fk-b-") as make_cluster:
        async def make(backend: str, nodes: dict[str, dict[str, str]], **node_options) -> TestCluster:
            harness = await store_factory(backend)

            def build(directory: Path) -> TestCluster:
                cluster = TestCluster(
                    directory, storage_section=storage_section(harness.storage_config("/fleetkit/")),
                    storage_factory=lambda: harness.new_storage("/fleetkit/"),
                )
                cluster.harness = harness
                return cluster

            return await make_cluster(build, nodes, **node_options)

        yield make
