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

from fleetkit.cli.devcluster import etcd_storage_section, free_port, node_config
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

    @property
    def endpoint(self) -> str:
        return f"unix://{self.directory / 'fleetkit.sock'}"

    @property
    def socket_path(self) -> Path:
        return self.directory / "fleetkit.sock"

    @property
    def log_path(self) -> Path:
        return self.directory / "daemon.log"

    async def start(self) -> None:
        """Start the daemon and wait until its control API socket exists."""
        self.socket_path.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.log_files.append(log)
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetkit", "daemon", "--config", str(self.config_path),
            stdout=log, stderr=log, start_new_session=True,
        )
        deadline = time.monotonic() + DAEMON_READY_TIMEOUT
        while not self.socket_path.exists():
            if self.process.returncode is not None:
                raise RuntimeError(f"daemon {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon {self.name} did not start:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

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

    def __init__(self, directory: Path, etcd_url: str = "", *, storage_section: str = "", storage_factory=None):
        """Nodes use `storage_section` as their ``[storage]`` table, or etcd v3 at `etcd_url`.

        `storage_factory()` returns a connected client of the same store; by
        default an etcd v3 client of `etcd_url`.
        """
        self.directory = directory
        self.etcd_url = etcd_url
        self.storage_section = storage_section or etcd_storage_section(etcd_url)
        self._storage_factory = storage_factory
        self.nodes: dict[str, Node] = {}

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
        node.config_path.write_text(self._config_text(node))
        self.nodes[name] = node
        return node

    def _config_text(self, node: Node) -> str:
        port, metadata, lease_ttl, agent_ttl, transport, transport_extra = node.config_args
        extra = transport_extra.format(port=port) if transport_extra else ""
        return node_config(
            self.directory, node.name, self.storage_section, port, node.manager, metadata,
            lease_ttl=lease_ttl, reconcile_interval="1s", agent_ttl=agent_ttl, transport=transport,
            transport_extra=extra,
        )

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

    def endpoint(self, exclude: str | None = None) -> str:
        for node in self.nodes.values():
            if node.running and node.name != exclude:
                return node.endpoint
        raise RuntimeError("no daemon is running\n" + self.logs())

    async def cli(self, *args: str, endpoint: str | None = None, timeout: float = 120.0) -> CliResult:
        """Run the real ``fleetkit`` CLI in a subprocess and return its exit code and output."""
        env = {**os.environ, "FLEETKIT_ENDPOINT": endpoint or self.endpoint()}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetkit", *args,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
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
