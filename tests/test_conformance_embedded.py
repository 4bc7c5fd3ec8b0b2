"""The storage conformance suite against the embedded backend, one store file per test."""

from __future__ import annotations

import pytest

from fleetkit.testing.conformance import StorageConformance, started_harness
from fleetkit.testing.embedded_harness import EmbeddedHarness


@pytest.fixture
async def harness():
    async with started_harness(EmbeddedHarness) as running:
        yield running


class TestEmbeddedConformance(StorageConformance):
    async def test_request_fails_fast_while_server_paused(self, harness) -> None:
        pytest.skip("the embedded store has no server process to pause (docs/storage-embedded.md, Limitations)")

    async def test_paused_leader_write_is_fenced(self, harness) -> None:
        pytest.skip("the embedded store admits one process, so no second process can lead "
                    "(docs/storage-embedded.md, Limitations); tests/test_embedded_storage.py checks fencing")
