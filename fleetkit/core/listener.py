"""One gRPC listener of the daemon on TCP: with TLS and roles, or plaintext when allowed.

`GrpcListener` serves the servicers that `register` adds. With TLS it runs
the gRPC server on a private unix socket behind a `fleetkit.core.gate.TlsGate`
and a `fleetkit.core.access.RoleInterceptor`, and reloads the certificate
files every ``[tls] reload_interval`` when they changed, or at once when
`reload` is called (on SIGHUP). Without TLS it binds gRPC to the port
directly; configuration validation allows that only with
``insecure = true``, and a warning is logged at every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable

import grpc

from fleetkit.core.access import RoleInterceptor
from fleetkit.core.credentials import ListenerSecurity, ServerCredentials, certificate_name
from fleetkit.core.gate import PeerRegistry, TlsGate

log = logging.getLogger(__name__)

# Room left in a unix socket address (108 bytes) for "/transport.sock.NNNNNNNN".
MAX_DIRECTORY_LENGTH = 80


class GrpcListener:
    """A gRPC server on `listen`, secured as `security` describes.

    Construction loads the certificates and raises TlsError when they do not
    work, so a daemon fails before it starts anything. `port` is the bound
    port once `ready` is set.
    """

    def __init__(self, listen: str, security: ListenerSecurity, register: Callable[[grpc.aio.Server], None], *,
                 what: str, reload_interval: float = 10.0, state_dir: str = ""):
        self.listen = listen
        self.state_dir = state_dir
        self.security = security
        self.register = register
        self.what = what
        self.reload_interval = reload_interval
        self.credentials = (ServerCredentials(security.tls, security.setting, security.role)
                            if security.tls is not None else None)
        self.port = 0
        self.ready = asyncio.Event()

    def reload(self, reason: str) -> None:
        """Load the certificate files again for new connections."""
        if self.credentials is not None:
            self.credentials.reload(reason)

    def certificate_files(self) -> list[str]:
        """Return the certificate files in use: this listener's certificate and CA, or none."""
        tls = self.security.tls
        return [tls.cert, tls.ca] if tls is not None else []

    async def serve(self) -> None:
        """Serve until cancelled."""
        if self.credentials is None:
            await self._serve_plaintext()
        else:
            await self._serve_tls()

    async def _serve_plaintext(self) -> None:
        server = grpc.aio.server()
        self.register(server)
        port = server.add_insecure_port(self.listen)
        if port == 0:
            raise OSError(f"cannot listen on {self.security.setting} = {self.listen!r}; is the address in use?")
        await server.start()
        self.port = port
        section = self.security.setting.partition(".")[0]
        log.warning("%s listening on %s WITHOUT TLS (%s.insecure = true): anyone who can reach the port is "
                    "trusted; see docs/security.md to set up certificates", self.what, self.listen, section)
        self.ready.set()
        try:
            await server.wait_for_termination()
        finally:
            await server.stop(grace=1.0)

    def _private_directory(self) -> tuple[str, bool]:
        """Return a directory that only this user can enter, and whether it is temporary.

        It is ``<node.state_dir>/gate``, where nothing cleans files away
        under a daemon that runs for months, unless that path is too long for
        a unix socket address (108 bytes).
        """
        if self.state_dir:
            directory = os.path.join(self.state_dir, "gate")
            if len(directory) <= MAX_DIRECTORY_LENGTH:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                os.chmod(directory, 0o700)
                return directory, False
            log.debug("%s is too long for unix socket addresses; the gate uses a temporary directory", directory)
        return tempfile.mkdtemp(prefix="fleetkit-"), True

    async def _serve_tls(self) -> None:
        # The gRPC server behind the gate speaks plaintext on a unix socket in
        # a directory that only this user can enter.
        directory, temporary = self._private_directory()
        inner = f"{directory}/{self.security.setting.partition('.')[0]}.sock"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(inner)  # left by a daemon that was killed
        registry = PeerRegistry()
        server = grpc.aio.server(interceptors=[RoleInterceptor(registry, self.security.setting)])
        self.register(server)
        try:
            if server.add_insecure_port(f"unix:{inner}") == 0:
                raise OSError(f"cannot create the socket {inner} behind {self.security.setting}")
            await server.start()
            gate = TlsGate(
                self.listen, inner, registry, setting=self.security.setting, credentials=self.credentials,
                plaintext=self.security.plaintext, check_peer_address=self.security.check_peer_address,
            )
            self.port = gate.bind()
            certificate = self.credentials.certificate
            log.info("%s listening on %s with TLS (certificate %r, CA %s); clients need certificates of the "
                     "cluster CA", self.what, self.listen, certificate_name(certificate), self.security.tls.ca)
            if self.security.plaintext:
                section = self.security.setting.partition(".")[0]
                log.warning("%s on %s also accepts plaintext connections without certificates (%s.insecure = "
                            "true); remove that setting once every node has certificates", self.what,
                            self.listen, section)
            self.ready.set()
            async with asyncio.TaskGroup() as group:
                group.create_task(gate.serve())
                group.create_task(self._watch_files())
                group.create_task(server.wait_for_termination())
        finally:
            await server.stop(grace=1.0)
            if temporary:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(inner)

    async def _watch_files(self) -> None:
        while True:
            await asyncio.sleep(self.reload_interval)
            self.credentials.reload_if_changed()
