"""The daemon: storage, engine candidate, agent, transport and control API in one process.

Stopping the daemon (SIGTERM, SIGINT) leaves every unit running; a restarted
daemon adopts them. A leader that stops resigns, so another node takes over
without waiting for the lease to expire. SIGHUP reloads the certificates
of the TLS listeners for new connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal

from fleetkit import __version__
from fleetkit.core import keys, plugins
from fleetkit.core.agent import Agent
from fleetkit.core.api import ApiServer
from fleetkit.core.config import Config
from fleetkit.core.credentials import ExpiryWarnings, ListenerSecurity, certificate_problems, earliest_expiry
from fleetkit.core.election import Election, LeaderRecord
from fleetkit.core.engine import Engine, LeadershipLost
from fleetkit.core.errors import ConfigError, FleetkitError, StorageError, StorageUnavailable
from fleetkit.core.hooks import call_safely, plugin_manager
from fleetkit.core.keyspace import claim_prefix
from fleetkit.core.nodes import NodeAdvertiser, newer_engines, new_record, read_nodes
from fleetkit.core.netinfo import detect_public_ip
from fleetkit.core.retry import Attempts, Backoff
from fleetkit.core.states import MachineInfo
from fleetkit.core.storage import Storage
from fleetkit.core.transport import EngineHost, Transport
from fleetkit.plugins.grpc_transport import GrpcTransport

log = logging.getLogger(__name__)

# How often certificate expiry is checked; warnings repeat once a day.
CERTIFICATE_CHECK_INTERVAL = 60.0


class Daemon:
    """Wires the components for one machine from a validated `Config`."""

    def __init__(self, config: Config, *, hooks=None):
        self.config = config
        problems, _expiring = certificate_problems(config)
        if problems:
            raise ConfigError(problems)
        self.hooks = hooks if hooks is not None else plugin_manager()
        storage_class = plugins.load_driver(plugins.STORAGE, config.storage.backend)
        runtime_class = plugins.load_driver(plugins.RUNTIME, config.runtime.backend)
        transport_class = plugins.load_driver(plugins.TRANSPORT, config.transport.mode)
        check_capabilities(storage_class, transport_class)

        self.storage: Storage = storage_class.from_config(config.storage)
        if not storage_class.capabilities.multi_key_transactions:
            log.warning(
                "storage.backend = %r cannot fence engine writes atomically: a leader that was paused past its "
                "lease can overwrite one schedule entry before it notices; see docs/storage.md",
                storage_class.name,
            )
        self.runtime = runtime_class.from_config(config.runtime)
        self.transport: Transport = transport_class(config, self.storage)

        public_ip = config.node.public_ip or detect_public_ip()
        self.machine = MachineInfo(
            id=config.node.name, ip=public_ip, metadata=dict(config.node.metadata), version=__version__,
        )
        self.host = EngineHost(self.machine.id)
        self.agent = Agent(self.machine, self.runtime)
        self.advertise = config.transport.advertise_address(public_ip)
        # Built here so that unreadable or mismatched certificates stop the daemon before it starts anything.
        self.api = ApiServer(config, self.storage, self.host, self.hooks)
        # Daemons that do not lead ask the leader for unit states over gRPC,
        # so a transport that does not serve gRPC gets a gRPC listener beside it.
        self.grpc_listener = None if self.transport.serves_grpc else GrpcTransport(config, self.storage)
        self.transport_security = ListenerSecurity.of(config, "transport")
        self.expiry = ExpiryWarnings(config.tls.expiry_warning)

    def listeners(self) -> list:
        """Return the TCP gRPC listeners of this daemon."""
        found = [self.api.listener]
        for transport in (self.transport, getattr(self.transport, "_grpc", None), self.grpc_listener):
            found.append(getattr(transport, "listener", None))
        return [listener for listener in dict.fromkeys(found) if listener is not None]

    def certificate_files(self) -> list[str]:
        """Return the certificate and CA files this daemon serves and dials with."""
        files = [path for listener in self.listeners() for path in listener.certificate_files()]
        tls = self.transport_security.tls
        if tls is not None:
            files += [tls.cert, tls.ca]
        return list(dict.fromkeys(files))

    def reload_certificates(self, reason: str) -> None:
        """Load the certificate files again for new connections, then warn about expiring ones."""
        for listener in self.listeners():
            listener.reload(reason)
        self.expiry.check(self.certificate_files())

    async def _watch_certificates(self, advertiser: NodeAdvertiser) -> None:
        """Warn about expiring certificates, and keep the node record's expiry current after rotations."""
        while True:
            files = self.certificate_files()
            self.expiry.check(files)
            expires = earliest_expiry(files)
            advertiser.update(dataclasses.replace(
                advertiser.record, certificate_expires=expires.timestamp() if expires else 0.0))
            await asyncio.sleep(CERTIFICATE_CHECK_INTERVAL)

    async def run(self) -> None:
        """Run until cancelled."""
        log.info(
            "fleetkit %s starting on machine %s (%s): storage %s, transport %s",
            __version__, self.machine.id, self.machine.ip or "no ip", self.storage.describe(), self.transport.name,
        )
        await self._connect_storage()
        call_safely(self.hooks.hook.fleetkit_daemon_started, config=self.config, machine=self.machine)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.transport.serve(self.host))
                if self.grpc_listener is not None:
                    group.create_task(self.grpc_listener.serve(self.host))
                group.create_task(self.api.serve())
                group.create_task(self.agent.run())
                group.create_task(self.transport.run_agent(self.agent))
                expires = earliest_expiry(self.certificate_files())
                record = new_record(
                    self.machine.id, __version__, tuple(plugins.available(plugins.TRANSPORT)),
                    engine=self.config.engine.enabled, address=self.advertise, mode=self.transport.name,
                    tls=self.transport_security.tls is not None,
                    certificate_expires=expires.timestamp() if expires else 0.0,
                )
                advertiser = NodeAdvertiser(self.storage, record, ttl=self.config.agent.ttl)
                group.create_task(advertiser.run())
                group.create_task(self._watch_certificates(advertiser))
                if self.config.engine.enabled:
                    group.create_task(self._lead())
        finally:
            call_safely(self.hooks.hook.fleetkit_daemon_stopping, config=self.config, machine=self.machine)
            await self.runtime.close()
            await self.storage.close()
            log.info("fleetkit stopped; units keep running")

    async def _connect_storage(self) -> None:
        attempts = Attempts(Backoff(initial=0.5, cap=5.0))
        reported = False
        while True:
            try:
                await self.storage.connect()
                await claim_prefix(self.storage, self.config.storage.prefix)
                if reported:
                    log.info("storage is reachable again")
                return
            except StorageUnavailable as error:
                if not reported:
                    log.error("storage is unreachable, retrying: %s", error)
                    reported = True
            await attempts.sleep()

    async def _lead(self) -> None:
        """Campaign for leadership and run the engine whenever this node leads."""
        security = self.transport_security
        record = LeaderRecord(machine=self.machine.id, address=self.advertise, version=__version__,
                              tls=security.tls is not None, plaintext=security.plaintext)
        election = Election(self.storage, key=keys.LEADER, record=record, ttl=self.config.engine.lease_ttl)
        attempts = Attempts(Backoff(initial=0.5, cap=5.0))
        while True:
            await self._wait_until_newest_engine()
            try:
                async with election.leadership() as leadership:
                    log.info("this machine (%s) is the leader; engine serving at %s", self.machine.id, self.advertise)
                    engine = Engine(
                        self.storage, leadership,
                        machine_ttl=self.config.agent.ttl, reconcile_interval=self.config.engine.reconcile_interval,
                        hooks=self.hooks,
                    )
                    self.host.set_engine(engine)
                    call_safely(self.hooks.hook.fleetkit_leadership_changed, machine=self.machine, leading=True)
                    try:
                        async with asyncio.TaskGroup() as group:
                            group.create_task(self._watch_for_newer_engines())
                            await engine.run()
                    finally:
                        self.host.set_engine(None)
                        call_safely(self.hooks.hook.fleetkit_leadership_changed, machine=self.machine, leading=False)
            except* LeadershipLost as group:
                log.warning("stopped leading: %s", _first_leaf(group))
            except* StorageError as group:
                log.error("engine stopped by a storage error: %s", group.exceptions[0])
                await attempts.sleep()


    async def _newer_engine(self) -> str:
        """Return a description of a newer engine candidate in the cluster, or "" when there is none."""
        try:
            newer = newer_engines(await read_nodes(self.storage), __version__)
        except StorageError as error:
            log.debug("cannot read node records: %s", error)
            return ""
        if not newer:
            return ""
        return f"machine {newer[0].machine} runs the newer engine version {newer[0].version}"

    async def _wait_until_newest_engine(self) -> None:
        """Wait while a newer engine candidate is present, so an older engine never takes the leadership."""
        reported = ""
        while True:
            newer = await self._newer_engine()
            if not newer:
                if reported:
                    log.info("no newer engine is present any more; campaigning for leadership")
                return
            if newer != reported:
                log.info("not campaigning for leadership (this is version %s): %s", __version__, newer)
                reported = newer
            await asyncio.sleep(self.config.engine.lease_ttl / 2)

    async def _watch_for_newer_engines(self) -> None:
        """Raise `LeadershipLost` once a newer engine candidate appears, so the leader hands over."""
        while True:
            await asyncio.sleep(self.config.engine.lease_ttl / 2)
            newer = await self._newer_engine()
            if newer:
                raise LeadershipLost(f"handing leadership over: {newer}")


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def check_capabilities(storage_class: type, transport_class: type) -> None:
    """Reject a storage backend that lacks what the transport needs, naming what is missing."""
    capabilities = storage_class.capabilities
    missing = sorted(name for name in transport_class.required_capabilities if not getattr(capabilities, name, False))
    if missing:
        raise FleetkitError(
            f"storage.backend = {storage_class.name!r} cannot run transport.mode = {transport_class.name!r}: "
            f"it lacks {', '.join(missing)}; choose another backend or transport"
        )


async def run_until_signalled(daemon: Daemon) -> None:
    """Run `daemon` until SIGTERM or SIGINT, then stop it leaving units running."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def stop(signum: signal.Signals) -> None:
        log.info("received %s; stopping this daemon (pid %d), units keep running", signum.name, os.getpid())
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_certificates, "SIGHUP")
    try:
        await daemon.run()
    except asyncio.CancelledError:
        pass  # the stop was logged by the signal handler
