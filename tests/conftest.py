"""Shared fixtures: real etcd servers, real systemd user managers and fleetkit clusters."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before any import of it, so that its failing asserts show their operands.
pytest.register_assert_rewrite("fleetkit.testing.scenario")

from fleetkit.testing.cluster import TestCluster, storage_section  # noqa: E402
from fleetkit.testing.conformance import started_harness  # noqa: E402
from fleetkit.testing import logscan  # noqa: E402

# Harness names for `store_factory` and `backend_cluster_factory`. A name picks
# the store server and its settings; the storage driver is the harness's
# `backend`, so "etcd3-tls" runs the etcd3 backend over TLS.
HARNESSES = {
    "etcd3": "fleetkit.testing.etcd3_harness:Etcd3Harness",
    "etcd3-tls": "fleetkit.testing.etcd3_harness:Etcd3TlsHarness",
    "etcd2": "fleetkit.testing.etcd2_harness:Etcd2Harness",
    "redis": "fleetkit.testing.redis_harness:RedisHarness",
    "redis-tls": "fleetkit.testing.redis_harness:RedisTlsHarness",
    "embedded": "fleetkit.testing.embedded_harness:EmbeddedHarness",
}


def harness_class(backend: str):
    module_name, _, class_name = HARNESSES[backend].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


pytest_plugins = ["fleetkit.testing.etcd", "fleetkit.testing.systemd"]

_ARCHIVE: dict[str, object] = {}


def pytest_configure(config):
    """Collect the logs of the whole run for tests/test_zz_secrets_in_logs.py.

    Daemon logs and CLI output of test clusters are archived by
    `fleetkit.testing.cluster`; warnings logged in this process go to
    ``in-process.log`` here.
    """
    if logscan.archive_dir() is not None:
        return  # an outer run owns the archive
    directory = Path(tempfile.mkdtemp(prefix="fk-logs-"))
    logscan.prepare(directory)
    handler = logging.FileHandler(directory / "logs" / "in-process.log", encoding="utf-8")
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    _ARCHIVE.update(directory=directory, handler=handler)


def pytest_unconfigure(config):
    handler = _ARCHIVE.pop("handler", None)
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()
    directory = _ARCHIVE.pop("directory", None)
    if directory is not None:
        os.environ.pop(logscan.ARCHIVE_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


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
    """Yield ``make(nodes={name: metadata})``, which starts etcd and a cluster on it; all stop at teardown.

    ``tls=True`` gives the cluster certificates and a control API on TCP with TLS (see `TestCluster`).
    """
    async with cluster_maker("fk-c-") as make_cluster:
        async def make(nodes: dict[str, dict[str, str]], *, tls: bool = False, tls_extra: str = "",
                       **node_options) -> TestCluster:
            etcd = etcd_factory()

            def build(directory: Path) -> TestCluster:
                cluster = TestCluster(directory, etcd.client_url, tls=tls, tls_extra=tls_extra)
                cluster.etcd = etcd
                return cluster

            return await make_cluster(build, nodes, **node_options)

        yield make


@pytest.fixture
async def store_factory():
    """Yield ``start(name)``, which starts a real store of a `HARNESSES` name and returns its harness.

    Every store stops at teardown.
    """
    async with contextlib.AsyncExitStack() as stack:
        async def start(name: str):
            return await stack.enter_async_context(started_harness(harness_class(name)))

        yield start


@pytest.fixture
async def backend_cluster_factory(store_factory):
    """Yield ``make(backend, nodes)``: a cluster on a fresh store of `backend`, a `HARNESSES` name; all stop at teardown."""
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
