"""Claiming the storage prefix on a real etcd."""

from __future__ import annotations

import uuid

import pytest

from fleetkit.core import keys
from fleetkit.core.errors import StorageError
from fleetkit.core.keyspace import claim_prefix
from fleetkit.plugins.etcd3 import Etcd3Storage


@pytest.fixture
async def storage(etcd_server):
    prefix = f"/keyspace-test/{uuid.uuid4().hex}/"
    client = Etcd3Storage([etcd_server.client_url], prefix=prefix)
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def test_claim_marks_empty_prefix(storage):
    await claim_prefix(storage, "/p/")

    marker = await storage.get(keys.FORMAT)
    assert marker is not None
    assert b"fleetkit_format" in marker.value


async def test_claim_accepts_fleetkit_data(storage):
    await storage.put("units/web.service", b"{}")
    await storage.put("schedule/web.service", b"node1")

    await claim_prefix(storage, "/p/")

    assert await storage.get(keys.FORMAT) is not None


async def test_claim_rejects_foreign_data(storage):
    await storage.put("config/app", b"value")

    with pytest.raises(StorageError, match="config/app"):
        await claim_prefix(storage, "/p/")
    assert await storage.get(keys.FORMAT) is None


async def test_claim_rejects_newer_format(storage):
    await storage.put(keys.FORMAT, b'{"fleetkit_format": 99}')

    with pytest.raises(StorageError, match="upgrade fleetkit"):
        await claim_prefix(storage, "/p/")


async def test_claim_rejects_foreign_marker(storage):
    await storage.put(keys.FORMAT, b"plain text")

    with pytest.raises(StorageError, match="did not write"):
        await claim_prefix(storage, "/p/")
