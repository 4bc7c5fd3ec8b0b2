"""Tests for the etcd v2 storage backend, against a real etcd serving the v2 API.

The shared conformance suite runs in test_conformance_etcd2.py. These tests
cover what is particular to v2: the key and value encoding, the lease
emulation, long polls, lost event history, failover and credentials.
"""

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import aiohttp
import pytest

from fleetkit.core.election import Election, LeaderRecord, watch_leader
from fleetkit.core.errors import CompactedError, FencingError, LeaseExpired, StorageError, StorageUnavailable
from fleetkit.core.retry import Backoff, retry
from fleetkit.core.storage import EventType, Fence
from fleetkit.core.watching import Snapshot, follow
from fleetkit.plugins.etcd2 import Etcd2Storage
from fleetkit.plugins.etcd2_codec import decode_value, encode_value
from fleetkit.testing.etcd import EtcdServer, find_etcd_binary, free_port
from fleetkit.testing.etcd2_harness import FILLER_KEY, V2EtcdServer

pytestmark = pytest.mark.skipif(find_etcd_binary() is None, reason="etcd executable not found")


@pytest.fixture(scope="module")
def v2_server():
    with tempfile.TemporaryDirectory(prefix="fk-e2-") as tmp:
        server = V2EtcdServer(Path(tmp) / "data")
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def own_server(tmp_path):
    """A v2 server owned by one test, which may kill, pause or reconfigure it."""
    server = V2EtcdServer(tmp_path / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _client(server: EtcdServer, prefix: str | None = None, **options) -> Etcd2Storage:
    options.setdefault("request_timeout", 2.0)
    options.setdefault("dial_timeout", 2.0)
    return Etcd2Storage([server.client_url], prefix=prefix or f"/fk-e2/{uuid.uuid4().hex[:10]}/", **options)


@contextlib.asynccontextmanager
async def connected(server: EtcdServer, prefix: str | None = None, **options):
    storage = _client(server, prefix, **options)
    await storage.connect()
    try:
        yield storage
    finally:
        await storage.close()


async def _raw(server: EtcdServer, method: str, path: str, **kwargs) -> dict:
    """Send one plain request to etcd's v2 API and return the JSON response."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.request(method, f"{server.client_url}{path}", **kwargs) as response:
            return await response.json(content_type=None)


async def _events(storage, prefix, start, count, timeout=10.0):
    seen = []
    async with asyncio.timeout(timeout):
        async with contextlib.aclosing(storage.watch(prefix, start_revision=start)) as stream:
            async for batch in stream:
                seen.extend(batch)
                if len(seen) >= count:
                    return seen
    return seen


# -- encoding ------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"", b"plain", b"~tilde", b'{"a": "\\u00e9"}', "é\u2028\x00\r\n<&>".encode(),
                                   bytes(range(256)), b"\xff\xfe"])
@pytest.mark.parametrize("lease", [0, 0x1F])
def test_decode_value_returns_encoded_value(value, lease):
    assert decode_value(encode_value(value, lease)) == (value, lease)


def test_decode_value_keeps_foreign_tilde_text():
    assert decode_value("~not encoded") == (b"~not encoded", 0)


async def test_put_stores_readable_flat_node(v2_server):
    async with connected(v2_server, "/fk-e2/flat/") as storage:
        await storage.put("units/web.service", b'{"name": "web"}')
        await storage.put("_hidden/./..", b"odd")

        raw = await _raw(v2_server, "GET", "/v2/keys/fk-e2/flat/units%252Fweb.service")
        odd = await storage.get("_hidden/./..")
        items, _ = await storage.list("")

    assert raw["node"]["value"] == '{"name": "web"}'
    assert odd.value == b"odd"
    assert [kv.key for kv in items] == ["_hidden/./..", "units/web.service"]


async def test_put_rejects_empty_key(v2_server):
    async with connected(v2_server) as storage:
        with pytest.raises(StorageError, match="empty key"):
            await storage.put("", b"v")


# -- compare-and-swap ------------------------------------------------------------


async def test_cas_races_with_puts_keep_revisions_consistent(v2_server):
    async with connected(v2_server) as storage:
        created = await storage.put("race", b"0")
        results = await asyncio.gather(
            *(storage.compare_and_swap("race", f"c{n}".encode(), expected_revision=created) for n in range(10)),
            *(storage.compare_and_swap("fresh", f"n{n}".encode(), expected_revision=0) for n in range(10)),
        )
        race, fresh = await storage.get("race"), await storage.get("fresh")

    swaps, creates = results[:10], results[10:]
    assert len([r for r in swaps if r is not None]) == 1
    assert len([r for r in creates if r is not None]) == 1
    assert race.create_revision == created
    assert race.mod_revision in swaps
    assert fresh.create_revision == fresh.mod_revision
    assert fresh.mod_revision in creates


# -- leases ----------------------------------------------------------------------


async def test_lease_node_hidden_from_list_and_watch(v2_server):
    async with connected(v2_server) as storage:
        _, start = await storage.list("")
        lease = await storage.grant_lease(30)
        last = await storage.put("leased", b"v", lease=lease)
        await storage.revoke_lease(lease)
        items, revision = await storage.list("")
        seen = await _events(storage, "", start + 1, 2)

    assert items == []
    assert [(e.type, e.key) for e in seen] == [(EventType.PUT, "leased"), (EventType.DELETE, "leased")]
    assert seen[0].revision == last
    assert revision >= seen[1].revision


async def test_lease_expiry_deletes_attached_keys_only(v2_server):
    async with connected(v2_server) as storage:
        lease = await storage.grant_lease(1)
        await storage.put("gone", b"1", lease=lease)
        await storage.put("kept", b"2", lease=lease)
        await storage.put("kept", b"3")  # rewritten without the lease: detached

        async def expired() -> bool:
            return await storage.get("gone") is None

        async with asyncio.timeout(6):
            while not await expired():
                await asyncio.sleep(0.2)
        kept = await storage.get("kept")
        with pytest.raises(LeaseExpired):
            await storage.refresh_lease(lease)

    assert (kept.value, kept.lease) == (b"3", 0)


async def test_refresh_lease_wakes_no_watcher(v2_server):
    async with connected(v2_server) as storage:
        lease = await storage.grant_lease(2)
        written = await storage.put("held", b"v", lease=lease)
        for _ in range(4):
            await asyncio.sleep(0.7)
            assert await storage.refresh_lease(lease) > 0
        marker = await storage.put("marker", b"m")
        seen = await _events(storage, "", written + 1, 1)
        held = await storage.get("held")

    assert [(e.key, e.revision) for e in seen] == [("marker", marker)]
    # NOTE: etcd moves the mod revision of a refreshed key; the create revision stays.
    assert (held.value, held.lease, held.create_revision) == (b"v", lease, written)


async def test_refresh_skips_key_detached_later(v2_server):
    async with connected(v2_server) as storage:
        lease = await storage.grant_lease(1)
        await storage.put("k", b"leased", lease=lease)
        await storage.put("k", b"permanent")
        await storage.refresh_lease(lease)
        await storage.revoke_lease(lease)
        await asyncio.sleep(1.6)

        current = await storage.get("k")

    assert (current.value, current.lease) == (b"permanent", 0)


async def test_put_with_revoked_lease_raises_lease_expired(v2_server):
    async with connected(v2_server) as storage:
        lease = await storage.grant_lease(10)
        await storage.revoke_lease(lease)

        with pytest.raises(LeaseExpired):
            await storage.put("k", b"v", lease=lease)
        assert await storage.get("k") is None


# -- fencing ---------------------------------------------------------------------


async def test_fenced_cas_rejected_after_fence_recreated(v2_server):
    async with connected(v2_server) as storage:
        fence = Fence("leader", await storage.put("leader", b"old"))
        written = await storage.put("jobs/a", b"1", fence=fence)
        await storage.delete("leader")
        await storage.put("leader", b"new")

        with pytest.raises(FencingError, match="re-created"):
            await storage.compare_and_swap("jobs/a", b"2", expected_revision=written, fence=fence)
        assert (await storage.get("jobs/a")).value == b"1"


# -- watch -----------------------------------------------------------------------


async def test_watch_repolls_after_idle_timeout(v2_server):
    async with connected(v2_server, poll_timeout=0.3) as storage:
        _, start = await storage.list("")

        async def later() -> int:
            await asyncio.sleep(1.2)
            return await storage.put("late", b"v")

        writer = asyncio.create_task(later())
        seen = await _events(storage, "", start + 1, 1)
        revision = await writer

    assert [(e.key, e.revision) for e in seen] == [("late", revision)]


async def test_watch_waiting_survives_churn_elsewhere(v2_server):
    async with connected(v2_server) as storage, connected(v2_server) as other:
        _, start = await storage.list("")
        watching = asyncio.create_task(_events(storage, "", start + 1, 1, timeout=30))
        await asyncio.sleep(0.3)
        for step in range(0, 1100, 50):
            await asyncio.gather(*(other.put(f"churn{n}", b"x") for n in range(step, step + 50)))
        mine = await storage.put("mine", b"v")

        seen = await watching

    assert [(e.key, e.revision) for e in seen] == [("mine", mine)]


async def test_watch_from_cleared_index_raises_compacted(v2_server):
    async with connected(v2_server) as storage:
        first = await storage.put("c", b"1")
        async with aiohttp.ClientSession() as session:
            url = f"{v2_server.client_url}/v2/keys{FILLER_KEY}"
            for number in range(1001):
                async with session.put(url, data={"value": str(number)}) as response:
                    response.raise_for_status()

        with pytest.raises(CompactedError) as caught:
            await _events(storage, "", first, 1)

    assert first < caught.value.compact_revision


async def test_watch_resumes_after_kill_without_loss(own_server):
    async with connected(own_server, watch_backoff=Backoff(initial=0.05, cap=0.3)) as watcher, \
            connected(own_server, watcher.prefix) as writer:
        _, start = await watcher.list("")
        expected = []

        async def write(key: str, value: bytes | None) -> None:
            if value is None:
                await retry(lambda: writer.delete(key), backoff=Backoff(initial=0.05, cap=0.3), deadline=20)
                expected.append((EventType.DELETE, key))
            else:
                await retry(lambda: writer.put(key, value), backoff=Backoff(initial=0.05, cap=0.3), deadline=20)
                expected.append((EventType.PUT, key))

        for n in range(5):
            await write(f"k{n}", b"v")
        seen_task = asyncio.create_task(_events(watcher, "", start + 1, 10, timeout=40))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(own_server.kill)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(own_server.start)
        for n in range(5):
            await write(f"k{n}", None if n % 2 else b"w")
        seen = await seen_task

    revisions = [e.revision for e in seen]
    assert revisions == sorted(set(revisions))
    assert [(e.type, e.key) for e in seen] == expected


async def test_follow_relists_after_cleared_index(v2_server):
    async with connected(v2_server) as storage:
        await storage.put("f/a", b"1")
        async with contextlib.aclosing(follow(storage, "f/", backoff=Backoff(initial=0.05, cap=0.2))) as updates:
            async with asyncio.timeout(30):
                first = await anext(updates)
                await storage.put("f/b", b"2")
                async with aiohttp.ClientSession() as session:
                    url = f"{v2_server.client_url}/v2/keys{FILLER_KEY}"
                    for number in range(1001):
                        async with session.put(url, data={"value": str(number)}) as response:
                            response.raise_for_status()
                second = await anext(updates)

    assert isinstance(first, Snapshot) and set(first.items) == {"f/a"}
    assert isinstance(second, Snapshot) and set(second.items) == {"f/a", "f/b"}


# -- connections -------------------------------------------------------------------


async def test_connect_fails_over_to_next_endpoint(v2_server):
    dead = f"http://user:secret-pw@127.0.0.1:{free_port()}"
    storage = Etcd2Storage([dead, v2_server.client_url], prefix="/fk-e2/failover/", dial_timeout=1.0)
    await storage.connect()
    try:
        written = await storage.put("k", b"v")
        assert (await storage.get("k")).mod_revision == written
    finally:
        await storage.close()

    assert "secret-pw" not in storage.describe()


async def test_connect_unreachable_names_endpoint(caplog):
    port = free_port()
    storage = Etcd2Storage([f"http://127.0.0.1:{port}"], password="secret-pw", username="u", dial_timeout=1.0)
    with pytest.raises(StorageUnavailable, match=f"127.0.0.1:{port}.*--enable-v2"):
        await storage.connect()
    await storage.close()
    assert "secret-pw" not in caplog.text


async def test_request_while_paused_raises_unavailable(own_server):
    async with connected(own_server, request_timeout=0.5) as storage:
        own_server.pause()
        try:
            with pytest.raises(StorageUnavailable, match="timed out"):
                await storage.get("k")
        finally:
            own_server.resume()


async def test_connect_without_v2_says_enable_it(etcd_factory):
    server = etcd_factory()
    storage = Etcd2Storage([server.client_url], dial_timeout=2.0, request_timeout=2.0)
    with pytest.raises(StorageError, match="--enable-v2") as caught:
        await storage.connect()
    await storage.close()
    assert not isinstance(caught.value, StorageUnavailable)


async def test_connect_with_wrong_password_says_credentials(own_server):
    root = {"user": "root", "password": "right-pw"}
    await _raw(own_server, "PUT", "/v2/auth/users/root", data=json.dumps(root),
               headers={"Content-Type": "application/json"})
    await _raw(own_server, "PUT", "/v2/auth/enable")

    wrong = _client(own_server, username="root", password="wrong-pw")
    with pytest.raises(StorageError, match="rejected the credentials") as caught:
        await wrong.connect()
    await wrong.close()
    async with connected(own_server, username="root", password="right-pw") as right:
        written = await right.put("k", b"v")

    assert not isinstance(caught.value, StorageUnavailable)
    assert "wrong-pw" not in str(caught.value)
    assert written > 0


# -- election ---------------------------------------------------------------------


async def _hold(election: Election, elected: asyncio.Event, release: asyncio.Event, leads: list) -> None:
    async with election.leadership() as lead:
        leads.append(lead)
        elected.set()
        await release.wait()


async def _collect_leaders(storage, records):
    async with contextlib.aclosing(watch_leader(storage)) as updates:
        async for record in updates:
            records.append(record)


async def test_election_survives_refreshes_then_hands_over(v2_server):
    prefix = f"/fk-e2/{uuid.uuid4().hex[:10]}/"
    events = [asyncio.Event() for _ in range(4)]
    first_elected, first_release, second_elected, second_release = events
    leads, records = [], []
    async with connected(v2_server, prefix) as first, connected(v2_server, prefix) as second, \
            connected(v2_server, prefix) as observer:
        one = asyncio.create_task(_hold(Election(first, record=LeaderRecord("m1", "m1:1", "0"), ttl=2),
                                        first_elected, first_release, leads))
        two = None
        watcher = asyncio.create_task(_collect_leaders(observer, records))
        try:
            async with asyncio.timeout(30):
                await first_elected.wait()
                two = asyncio.create_task(_hold(Election(second, record=LeaderRecord("m2", "m2:1", "0"), ttl=2),
                                                second_elected, second_release, leads))
                await asyncio.sleep(5)  # several refreshes; none may look like a change of the leader key
                held = leads[0].is_held() and leads[0].lost_reason is None
                challenger_waited = not second_elected.is_set()
                first_release.set()
                await one
                await second_elected.wait()
                await asyncio.sleep(0.3)
        finally:
            first_release.set()
            second_release.set()
            watcher.cancel()
            await asyncio.gather(one, *([two] if two else []), watcher, return_exceptions=True)

    assert held
    assert challenger_waited
    assert leads[1].fence.create_revision > leads[0].fence.create_revision
    assert [r.machine for r in records if r is not None] == ["m1", "m2"]


# -- TLS ---------------------------------------------------------------------------


class _TlsEtcdServer(V2EtcdServer):
    """A v2 etcd whose client URL is https, with a certificate signed by a test CA."""

    def __init__(self, data_dir: Path, certs: dict[str, Path]):
        super().__init__(data_dir)
        self.certs = certs

    @property
    def client_url(self) -> str:
        return f"https://{self.host}:{self.client_port}"

    def _command(self) -> list[str]:
        return [*super()._command(), "--cert-file", str(self.certs["server.crt"]),
                "--key-file", str(self.certs["server.key"])]

    def healthy(self) -> bool:
        # Start-up waits for the port; the tests talk TLS to it themselves.
        with contextlib.suppress(OSError):
            with socket.create_connection((self.host, self.client_port), timeout=1.0):
                return True
        return False


def _make_certs(directory: Path) -> dict[str, Path]:
    """Create a CA and a server certificate for 127.0.0.1 with openssl."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fleetkit test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (directory / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.crt")
    return {name: directory / name for name in ("ca.crt", "server.crt", "server.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not found")
async def test_https_endpoint_needs_matching_ca(tmp_path):
    certs = _make_certs(tmp_path)
    server = _TlsEtcdServer(tmp_path / "data", certs)
    await asyncio.to_thread(server.start)
    try:
        trusted = Etcd2Storage([server.client_url], ca_file=str(certs["ca.crt"]), prefix="/fk-e2/tls/")
        untrusted = Etcd2Storage([server.client_url], prefix="/fk-e2/tls/")
        await retry(trusted.connect, backoff=Backoff(initial=0.1, cap=0.5), deadline=10)
        try:
            written = await trusted.put("k", b"v")
            value = (await trusted.get("k")).value
        finally:
            await trusted.close()
        with pytest.raises(StorageError, match="certificate") as caught:
            await untrusted.connect()
        await untrusted.close()
    finally:
        await asyncio.to_thread(server.stop)

    assert written > 0
    assert value == b"v"
    assert not isinstance(caught.value, StorageUnavailable)
