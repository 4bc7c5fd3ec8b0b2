"""A cluster of real fleetkit daemons for end-to-end tests.

Each node is a ``fleetkit daemon`` subprocess with its own real systemd user
manager (see `fleetkit.usermanager`) and config, all on loopback and sharing
one etcd. Tests drive it through the real CLI (`TestCluster.cli`) and check
what systemd itself reports (`Node.unit_property`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleetkit.cli.devcluster import etcd_storage_section, free_port, issue_dev_certificates, node_config
from fleetkit.core.tls import issue
from fleetkit.testing import logscan
from fleetkit.core.durations import format_duration
from fleetkit.usermanager import UserManager, start_user_manager

DAEMON_READY_TIMEOUT = 30.0


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@dataclass
class Node:
    """One simulated machine: a user manager and, while started, a daemon process."""

    name: str
    directory: Path
    manager: UserManager
    config_path: Path
    process: asyncio.subprocess.Process | None = None
    log_files: list = field(default_factory=list)
    # Transport port, metadata, lease TTL, agent TTL, transport mode and extra [transport] lines
    # (where "{port}" stands for the transport port), to write the config again.
    config_args: tuple = ()
    # The control API's TCP port when the cluster uses TLS; 0 for the unix socket.
    api_port: int = 0
    # (certificates, plaintext allowed) when set by TestCluster.set_security; None follows the cluster.
    security: tuple[bool, bool] | None = None

    @property
    def endpoint(self) -> str:
        if self.api_port:
            return f"127.0.0.1:{self.api_port}"
        return f"unix://{self.directory / 'fleetkit.sock'}"

    @property
    def socket_path(self) -> Path:
        return self.directory / "fleetkit.sock"

    @property
    def log_path(self) -> Path:
        return self.directory / "daemon.log"

    async def start(self) -> None:
        """Start the daemon and wait until its control API listens."""
        self.socket_path.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.log_files.append(log)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetkit", "daemon", "--config", str(self.config_path),
            stdout=log, stderr=log, start_new_session=True,
        )
        deadline = time.monotonic() + DAEMON_READY_TIMEOUT
        while not await self._api_listens():
            if self.process.returncode is not None:
                raise RuntimeError(f"daemon {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon {self.name} did not start:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    async def _api_listens(self) -> bool:
        if not self.api_port:
            return self.socket_path.exists()
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", self.api_port)
        except OSError:
            return False
        writer.close()
        return True

    async def kill(self) -> None:
        """SIGKILL the daemon, as a crash would."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the daemon and wait; SIGKILL after `timeout`."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                await self.process.wait()
        except TimeoutError:
            await self.kill()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def unit_property(self, unit: str, name: str) -> str:
        """Return a property of `unit` as this node's systemd reports it (``systemctl --user show``)."""
        env = {**os.environ, **self.manager.env()}
        process = await asyncio.create_subprocess_exec(
            "systemctl", "--user", "show", "-p", name, "--value", unit,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(15):
            stdout, _ = await process.communicate()
        return stdout.decode().strip()

    async def main_pids(self, pattern: str = "*.service") -> dict[str, str]:
        """Return the MainPID of every active unit matching `pattern`, read with one ``systemctl show``."""
        names = sorted(await self.active_units(pattern))
        if not names:
            return {}
        env = {**os.environ, **self.manager.env()}
        process = await asyncio.create_subprocess_exec(
            "systemctl", "--user", "show", "-p", "Id", "-p", "MainPID", *names,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            stdout, _ = await process.communicate()
        pids = {}
        # One block of properties per unit, in systemd's own property order, separated by blank lines.
        for block in stdout.decode().split("\n\n"):
            properties = dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
            if "Id" in properties and "MainPID" in properties:
                pids[properties["Id"]] = properties["MainPID"]
        return pids

    async def active_units(self, pattern: str = "*") -> set[str]:
        """Return the names of the units systemd reports active that match `pattern`."""
        env = {**os.environ, **self.manager.env()}
        process = await asyncio.create_subprocess_exec(
            "systemctl", "--user", "list-units", "--state=active", "--no-legend", "--plain", pattern,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(15):
            stdout, _ = await process.communicate()
        return {line.split()[0] for line in stdout.decode().splitlines() if line.strip()}


def storage_section(config) -> str:
    """Return the TOML lines of a ``[storage]`` table for a `StorageConfig`."""
    lines = [f"backend = {json.dumps(config.backend)}", f"prefix = {json.dumps(config.prefix)}"]
    if config.endpoints:
        lines.append(f"endpoints = {json.dumps(list(config.endpoints))}")
    for key in ("username", "password", "ca_file", "cert_file", "key_file", "path"):
        value = getattr(config, key, "")
        if value:
            lines.append(f"{key} = {json.dumps(value)}")
    for key in ("dial_timeout", "request_timeout"):
        lines.append(f"{key} = {json.dumps(format_duration(getattr(config, key)))}")
    return "\n".join(lines)


class TestCluster:
    """Nodes sharing one etcd; create with `start`, always `close`."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, etcd_url: str = "", *, storage_section: str = "", storage_factory=None,
                 tls: bool = False, tls_extra: str = ""):
        """Nodes use `storage_section` as their ``[storage]`` table, or etcd v3 at `etcd_url`.

        `storage_factory()` returns a connected client of the same store; by
        default an etcd v3 client of `etcd_url`. With `tls`, the cluster gets a
        CA in ``<directory>/tls``, every node a node certificate, and the
        control API listens on TCP with TLS; `cli` then uses the admin
        certificate. `tls_extra` adds lines to each node's ``[tls]`` table.
        """
        self.directory = directory
        self.etcd_url = etcd_url
        self.storage_section = storage_section or etcd_storage_section(etcd_url)
        self._storage_factory = storage_factory
        self.nodes: dict[str, Node] = {}
        self.tls_dir = directory / "tls" if tls else None
        self.tls_extra = tls_extra
        self.client_files: dict[str, Path] = {}

    async def add_node(
        self, name: str, metadata: dict[str, str] | None = None, *, lease_ttl: str = "4s", agent_ttl: str = "8s",
        transport: str = "grpc", transport_extra: str = "",
    ) -> Node:
        node_dir = self.directory / name
        node_dir.mkdir(parents=True, exist_ok=True)
        manager = await start_user_manager(str(self.directory / "managers"), name=name)
        config_path = node_dir / "cluster.toml"
        node = Node(name=name, directory=node_dir, manager=manager, config_path=config_path)
        node.config_args = (free_port(), metadata or {}, lease_ttl, agent_ttl, transport, transport_extra)
        if self.tls_dir is not None:
            if not self.client_files:
                self.client_files = issue_dev_certificates(self.tls_dir, [])
            issue(self.tls_dir, self.tls_dir, name=name, role="node", ips=["127.0.0.1"], dns=["localhost"])
            node.api_port = free_port()
        node.config_path.write_text(self._config_text(node))
        self.nodes[name] = node
        return node

    def _config_text(self, node: Node) -> str:
        port, metadata, lease_ttl, agent_ttl, transport, transport_extra = node.config_args
        extra = transport_extra.format(port=port) if transport_extra else ""
        tls_dir, also_plaintext = self.tls_dir, False
        if node.security is not None:
            certificates, also_plaintext = node.security
            tls_dir = self.directory / "tls" if certificates else None
        return node_config(
            self.directory, node.name, self.storage_section, port, node.manager, metadata,
            lease_ttl=lease_ttl, reconcile_interval="1s", agent_ttl=agent_ttl, transport=transport,
            transport_extra=extra, tls_dir=tls_dir, api_port=node.api_port, tls_extra=self.tls_extra,
            also_plaintext=also_plaintext,
        )

    def set_security(self, name: str, *, certificates: bool, plaintext: bool) -> None:
        """Rewrite node `name`'s config: with or without a node certificate, with or without plaintext.

        The cluster CA and the node's certificate are made in
        ``<directory>/tls`` the first time they are needed. A restart applies it.
        """
        node = self.nodes[name]
        tls_dir = self.directory / "tls"
        if certificates and not (tls_dir / f"{name}.pem").exists():
            if not (tls_dir / "ca.pem").exists():
                self.client_files = issue_dev_certificates(tls_dir, [])
            issue(tls_dir, tls_dir, name=name, role="node", ips=["127.0.0.1"], dns=["localhost"])
        node.security = (certificates, plaintext)
        node.config_path.write_text(self._config_text(node))

    def set_transport(self, name: str, mode: str) -> None:
        """Rewrite node `name`'s config with another ``[transport] mode``; a restart applies it."""
        node = self.nodes[name]
        port, metadata, lease_ttl, agent_ttl, _mode, transport_extra = node.config_args
        node.config_args = (port, metadata, lease_ttl, agent_ttl, mode, transport_extra)
        node.config_path.write_text(self._config_text(node))

    def set_storage(self, storage_section: str, storage_factory=None) -> None:
        """Point every node's config at another store; daemons started afterwards use it."""
        self.storage_section = storage_section
        self._storage_factory = storage_factory
        for node in self.nodes.values():
            node.config_path.write_text(self._config_text(node))

    async def start(self, timeout: float = 30.0) -> None:
        """Start every daemon that is not running, then wait until the leader lists all machines as connected."""
        await asyncio.gather(*(node.start() for node in self.nodes.values() if not node.running))
        if not self.nodes:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = await self.cli("list-machines", "--output", "json")
            if result.code == 0:
                connected = {row["machine"] for row in json.loads(result.stdout) if row["connected"]}
                if connected >= set(self.nodes):
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"not every machine connected to the leader within {timeout:.0f}s\n" + self.logs())

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.stop()
        for node in self.nodes.values():
            await node.manager.stop()
            for log in node.log_files:
                log.close()
        # Keep what the daemons logged, and the secrets they were given, for the scan at the end of a test run.
        for line in self.storage_section.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "password":
                logscan.register_secret(json.loads(value.strip()))
        logscan.register_key_files(self.directory)
        for node in self.nodes.values():
            logscan.archive_file(node.log_path, f"daemon-{node.name}")

    def endpoint(self, exclude: str | None = None) -> str:
        for node in self.nodes.values():
            if node.running and node.name != exclude:
                return node.endpoint
        raise RuntimeError("no daemon is running\n" + self.logs())

    def client_env(self, identity: str = "admin") -> dict[str, str]:
        """Return the environment that makes the CLI use the client certificate `identity` ("admin", "viewer")."""
        if not self.client_files:
            return {}
        return {"FLEETKIT_CA_FILE": str(self.client_files["ca"]),
                "FLEETKIT_CERT_FILE": str(self.client_files[identity]),
                "FLEETKIT_KEY_FILE": str(self.client_files[f"{identity}-key"])}

    async def cli(self, *args: str, endpoint: str | None = None, timeout: float = 120.0,
                  env: dict[str, str] | None = None) -> CliResult:
        """Run the real ``fleetkit`` CLI in a subprocess and return its exit code and output.

        On a TLS cluster the CLI uses the admin certificate unless `env` names other files.
        """
        env = {**os.environ, **self.client_env(), **(env or {}), "FLEETKIT_ENDPOINT": endpoint or self.endpoint()}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetkit", *args,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
        logscan.archive_text(stdout.decode(errors="replace") + stderr.decode(errors="replace"), "cli")
        return CliResult(process.returncode, stdout.decode(), stderr.decode())

    async def leader(self) -> str:
        """Return the name of the node whose engine leads, from the leader record in storage."""
        from fleetkit.core.election import read_leader

        if self._storage_factory is not None:
            storage = await self._storage_factory()
        else:
            from fleetkit.plugins.etcd3 import Etcd3Storage

            storage = Etcd3Storage([self.etcd_url], prefix="/fleetkit/")
            await storage.connect()
        try:
            found = await read_leader(storage)
        finally:
            await storage.close()
        return found[0].machine if found else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{node.log_tail(150)}" for name, node in self.nodes.items())
