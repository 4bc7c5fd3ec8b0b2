"""Shared fixtures: real etcd servers, real systemd user managers and fleetkit clusters."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from fleetkit.testing.cluster import TestCluster

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
