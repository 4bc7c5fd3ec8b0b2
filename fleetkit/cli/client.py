"""The control API client used by the CLI."""

from __future__ import annotations

import grpc

from fleetkit.core.errors import ApiError
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


class ControlClient:
    """Thin async wrapper that turns gRPC failures into `ApiError` with a readable message."""

    def __init__(self, endpoint: str, *, timeout: float = REQUEST_TIMEOUT):
        self.endpoint = endpoint
        self._timeout = timeout
        self._channel = grpc.aio.insecure_channel(grpc_target(endpoint))
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
