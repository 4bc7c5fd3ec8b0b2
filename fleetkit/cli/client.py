"""The control API client used by the CLI."""

from __future__ import annotations

import grpc

from fleetkit.core.credentials import TlsFiles, channel_credentials
from fleetkit.core.errors import ApiError
from fleetkit.core.tls import TlsError
from fleetkit.rpc import control_pb2 as pb
from fleetkit.rpc import control_pb2_grpc as pb_grpc

DEFAULT_ENDPOINT = "unix:///run/fleetkit/fleetkit.sock"
REQUEST_TIMEOUT = 30.0


def grpc_target(endpoint: str) -> str:
    """Return the gRPC target for an endpoint written as ``unix:///path`` or ``host:port``."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
        if not path.startswith("/"):
            raise ApiError(
                f"endpoint {endpoint!r} is invalid: a unix socket needs an absolute path, for example unix:///run/fleetkit/fleetkit.sock",
                code="INVALID_ARGUMENT",
            )
        return f"unix:{path}"
    if "://" in endpoint:
        raise ApiError(
            f"endpoint {endpoint!r} is invalid: the only URL form is unix:///path/to/fleetkit.sock; "
            "for TCP give host:port without a scheme",
            code="INVALID_ARGUMENT",
        )
    host, separator, port = endpoint.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise ApiError(
            f"endpoint {endpoint!r} is invalid: use unix:///path/to/fleetkit.sock or host:port",
            code="INVALID_ARGUMENT",
        )
    return endpoint


def open_control_channel(endpoint: str, tls: TlsFiles | None, insecure: bool) -> grpc.aio.Channel:
    """Open a channel to `endpoint`: a unix socket as is, TCP with TLS, or TCP in plaintext when `insecure`."""
    target = grpc_target(endpoint)
    if target.startswith("unix:"):
        return grpc.aio.insecure_channel(target)
    if tls is not None:
        try:
            return grpc.aio.secure_channel(target, channel_credentials(tls))
        except TlsError as error:
            raise ApiError(str(error), code="INVALID_ARGUMENT") from None
    if insecure:
        return grpc.aio.insecure_channel(target)
    raise ApiError(
        f"endpoint {endpoint!r} is a TCP address: pass --ca-file, --cert-file and --key-file (or set "
        "FLEETKIT_CA_FILE, FLEETKIT_CERT_FILE and FLEETKIT_KEY_FILE) to use its TLS listener, or --insecure if "
        "the daemon accepts plaintext (api.insecure = true)",
        code="INVALID_ARGUMENT",
    )


class ControlClient:
    """Thin async wrapper that turns gRPC failures into `ApiError` with a readable message.

    `tls` gives the CA, certificate and key for a TCP endpoint; `insecure`
    allows plaintext to a TCP endpoint instead. A unix socket needs neither.
    """

    def __init__(self, endpoint: str, *, timeout: float = REQUEST_TIMEOUT, tls: TlsFiles | None = None,
                 insecure: bool = False):
        self.endpoint = endpoint
        self._timeout = timeout
        self._tls = tls
        self._channel = open_control_channel(endpoint, tls, insecure)
        self._stub = pb_grpc.ControlStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self._timeout, wait_for_ready=False)
        except grpc.aio.AioRpcError as error:
            raise self._translate(error) from None

    def _translate(self, error: grpc.aio.AioRpcError) -> ApiError:
        code = error.code()
        if code is grpc.StatusCode.UNAVAILABLE and "storage" not in (error.details() or "") and "leader" not in (error.details() or ""):
            message = (
                f"cannot reach the fleetkit daemon at {self.endpoint}: {error.details()}; "
                "check that the daemon runs and pass --endpoint or set FLEETKIT_ENDPOINT"
            )
            if not self.endpoint.startswith("unix://"):
                message += self._tls_hint(error.details() or "")
        elif code is grpc.StatusCode.UNIMPLEMENTED:
            message = (
                f"the server at {self.endpoint} is not a fleetkit daemon (it does not serve fleetkit's control API); "
                "check --endpoint or FLEETKIT_ENDPOINT"
            )
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            message = f"the fleetkit daemon at {self.endpoint} did not answer within {self._timeout:.0f}s"
        else:
            message = error.details() or code.name
        return ApiError(message, code=code.name)

    def _tls_hint(self, details: str) -> str:
        if self._tls is None:
            return ("; if the daemon runs, its listener probably requires TLS: pass --ca-file, --cert-file and "
                    "--key-file instead of --insecure")
        if "Hostname Verification" in details or "Peer name" in details:
            return (f"; the daemon's certificate does not name {self.endpoint.rpartition(':')[0]}: dial an "
                    "address listed in its SANs (fleetkit tls show CERT) or reissue it with that --ip or --dns")
        return ("; the TLS handshake may have failed: check that --ca-file is the cluster CA, that --cert-file "
                "is valid, not expired and issued by that CA, and the daemon's log for the reason")

    async def submit(self, sources: list[tuple[str, str]], desired_state: str, *, replace: bool = False):
        request = pb.SubmitUnitsRequest(
            units=[pb.UnitSource(name=name, unit_file=text) for name, text in sources],
            desired_state=desired_state, replace=replace,
        )
        return (await self._call(self._stub.SubmitUnits, request)).results

    async def set_desired_state(self, names: list[str], desired_state: str):
        request = pb.SetDesiredStateRequest(names=names, desired_state=desired_state)
        return (await self._call(self._stub.SetDesiredState, request)).results

    async def destroy(self, names: list[str]):
        return (await self._call(self._stub.DestroyUnits, pb.UnitNames(names=names))).results

    async def units(self, names: list[str] | None = None):
        return list((await self._call(self._stub.GetUnits, pb.UnitNames(names=names or []))).units)

    async def unit_states(self):
        return list((await self._call(self._stub.ListUnitStates, pb.ListRequest())).states)

    async def cluster_status(self):
        return await self._call(self._stub.GetClusterStatus, pb.ListRequest())

    async def machines(self):
        return list((await self._call(self._stub.ListMachines, pb.ListRequest())).machines)
