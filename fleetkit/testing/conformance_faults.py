"""Conformance tests for faults: a paused server, an unreachable endpoint and a paused leader."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fleetkit.core.config import StorageConfig
from fleetkit.core.election import Election, LeaderRecord
from fleetkit.core.errors import StorageUnavailable
from fleetkit.core.plugins import STORAGE, load_driver
from fleetkit.core.retry import Backoff, retry
from fleetkit.testing import logscan
from fleetkit.testing.conformance_support import ConformanceBase, clients, unique_prefix
from fleetkit.testing.leader_probe import WRITE_DEADLINE, WRITE_KEY

if TYPE_CHECKING:
    from fleetkit.testing.conformance import StoreHarness

# Python start-up and imports in the probe subprocess can take a few seconds on a busy machine.
PROBE_START = 20.0


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _unreachable(config: StorageConfig, directory: Path, password: str) -> tuple[StorageConfig, str]:
    """Return `config` pointed at a closed port (or an absent socket), with `password` set, and the address text.

    The password goes into the URL's user information and, when StorageConfig
    has one, into its `password` field, so that either way of passing it is
    checked for leaks.
    """
    parts = urllib.parse.urlsplit(config.endpoints[0])
    if parts.hostname:
        host = parts.hostname
        address = f"[{host}]:" if ":" in host else f"{host}:"
        address += str(_free_port(host))
        url = parts._replace(netloc=f"conformance:{password}@{address}").geturl()
    else:
        address = str(directory / "absent" / "store.sock")
        url = parts._replace(path=address).geturl()
    changes: dict[str, Any] = {"endpoints": (url,)}
    if "password" in {field.name for field in dataclasses.fields(StorageConfig)}:
        changes["password"] = password
    return dataclasses.replace(config, **changes), address


async def _read_report(stdout: asyncio.StreamReader, timeout: float) -> dict[str, Any]:
    """Read the probe's next JSON line; fail the test with the line it printed when it is not JSON."""
    async with asyncio.timeout(timeout):
        line = await stdout.readline()
    if not line:
        raise AssertionError("the leader probe exited without reporting")
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise AssertionError(f"the leader probe printed {line!r}") from None


class FaultTests(ConformanceBase):
    """Failures are reported quickly as StorageUnavailable, and stale leaders are fenced."""

    async def test_request_fails_fast_while_server_paused(self, harness: StoreHarness) -> None:
        prefix = unique_prefix()
        config = harness.storage_config(prefix)
        async with clients(harness, prefix, 1) as (storage,):
            await storage.put("k", b"v")
            await harness.pause()
            started = time.monotonic()
            try:
                with pytest.raises(StorageUnavailable):
                    async with asyncio.timeout(config.request_timeout + self.slack):
                        await storage.get("k")
                took = time.monotonic() - started
            finally:
                await harness.resume()
            after = await retry(lambda: storage.get("k"), backoff=Backoff(initial=0.05, cap=0.5),
                                deadline=config.dial_timeout + config.request_timeout + self.slack)

        assert took <= config.request_timeout + self.slack
        assert after is not None
        assert after.value == b"v"

    async def test_connect_to_unreachable_endpoint_names_it(self, harness: StoreHarness,
                                                            caplog: pytest.LogCaptureFixture) -> None:
        config = harness.storage_config(unique_prefix())
        if not config.endpoints:
            pytest.skip(f"the {harness.backend} store has no endpoint to make unreachable")
        password = f"pw-{uuid.uuid4().hex}"
        logscan.register_secret(password)
        unreachable, address = _unreachable(config, harness.directory, password)
        storage = load_driver(STORAGE, harness.backend).from_config(unreachable)
        caplog.set_level(logging.DEBUG)

        try:
            with pytest.raises(StorageUnavailable) as caught:
                async with asyncio.timeout(unreachable.dial_timeout + self.slack):
                    await storage.connect()
        finally:
            await storage.close()

        message = str(caught.value)
        assert address in message, f"{message!r} does not name the endpoint {address}"
        assert password not in message
        assert password not in storage.describe()
        assert password not in caplog.text

    async def test_paused_leader_write_is_fenced(self, harness: StoreHarness) -> None:
        prefix = unique_prefix()
        config = json.dumps(dataclasses.asdict(harness.storage_config(prefix)))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetkit.testing.leader_probe", harness.backend,
            "--ttl", str(self.lease_ttl), "--deadline", "120",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        try:
            process.stdin.write(config.encode() + b"\n")
            await process.stdin.drain()
            elected = await _read_report(process.stdout, PROBE_START)
            assert elected["event"] == "leader", elected
            os.kill(process.pid, signal.SIGSTOP)

            async with clients(harness, prefix, 1) as (storage,), contextlib.AsyncExitStack() as stack:
                election = Election(storage, record=LeaderRecord("successor", "127.0.0.1:2", "0"), ttl=self.lease_ttl)
                # The probe's lease must expire on the server before this campaign can win.
                async with asyncio.timeout(self.lease_ttl + self.slack + 2):
                    lead = await stack.enter_async_context(election.leadership())
                os.kill(process.pid, signal.SIGCONT)
                process.stdin.write(b"write\n")
                await process.stdin.drain()
                outcome = await _read_report(process.stdout, WRITE_DEADLINE + self.slack)
                written = await storage.get(WRITE_KEY)

            async with asyncio.timeout(10):
                status = await process.wait()
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
                    process.kill()
                await process.wait()

        assert lead.fence.create_revision > elected["fence_revision"]
        assert outcome["event"] == "write", outcome
        assert outcome["result"] == "fenced", outcome
        assert written is None
        assert status == 0
