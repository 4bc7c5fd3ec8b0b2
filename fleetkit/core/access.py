"""Certificate roles and the gRPC methods each may call, enforced by a server interceptor.

Roles (see `fleetkit.core.tls`): ``node`` certificates may use the
engine–agent transport, ``admin`` certificates the whole control API, and
``read-only`` certificates the control API's listing and showing calls.
Plaintext peers of a listener with ``insecure = true`` are not checked:
that setting is the operator's choice to trust the network.

`RoleInterceptor` looks the caller up in the gate's `PeerRegistry` and
aborts a call outside the caller's role with PERMISSION_DENIED and a message
that names the certificate, its role and the role needed.
"""

from __future__ import annotations

import contextvars
import inspect
import logging

import grpc

from fleetkit.core.gate import Peer, PeerRegistry, RejectionLog

log = logging.getLogger(__name__)

# The verified peer of the call being served, for servicers that check more than the role.
current_peer: contextvars.ContextVar[Peer | None] = contextvars.ContextVar("current_peer", default=None)

TRANSPORT_SERVICE = "/fleetkit.rpc.AgentTransport/"
CONTROL_SERVICE = "/fleetkit.rpc.Control/"
# Control calls that only read; every other control call changes units.
READ_ONLY_CALLS = frozenset({"GetUnits", "ListUnitStates", "ListMachines", "GetClusterStatus"})
# The fleetkit commands behind each control call, for messages.
COMMANDS = {
    "SubmitUnits": "submit, load and start", "SetDesiredState": "load, start, stop and unload",
    "DestroyUnits": "destroy", "GetUnits": "cat, status and list-unit-files", "ListUnitStates": "list-units and status",
    "ListMachines": "list-machines", "GetClusterStatus": "cluster status",
}


def allowed_roles(method: str) -> frozenset[str]:
    """Return the roles that may call the full gRPC method name `method`."""
    if method.startswith(TRANSPORT_SERVICE):
        return frozenset({"node"})
    if method.startswith(CONTROL_SERVICE):
        if method.removeprefix(CONTROL_SERVICE) in READ_ONLY_CALLS:
            return frozenset({"admin", "read-only"})
        return frozenset({"admin"})
    return frozenset()


def denial(method: str, peer: Peer) -> str:
    """Return the message for `peer` calling `method` outside its role."""
    call = method.rpartition("/")[2]
    who = f"certificate {peer.name!r} has role {peer.role}"
    if method.startswith(TRANSPORT_SERVICE):
        return f"{who}; the engine-agent transport ({call}) needs a node certificate"
    commands = f"{call}, used by {COMMANDS[call]}" if call in COMMANDS else call
    if peer.role == "read-only":
        return f"{who}, which may only list and show; {commands} needs an admin certificate"
    if method.startswith(CONTROL_SERVICE):
        return (f"{who}, which may use the engine-agent transport only; the control API ({commands}) needs an "
                "admin certificate, or a read-only one to list and show")
    return f"{who}; {method} is not a fleetkit call"


class RoleInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls whose caller's certificate role does not allow the method."""

    def __init__(self, registry: PeerRegistry, setting: str):
        self.registry = registry
        self.denials = RejectionLog(setting)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        roles = allowed_roles(method)
        registry, denials = self.registry, self.denials

        async def check(context) -> None:
            peer = registry.lookup(context.peer())
            if peer is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the connection has no verified peer")
            current_peer.set(peer)
            if peer.plaintext or peer.role in roles:
                return
            message = denial(method, peer)
            denials.report(peer.address, f"denied {method.rpartition('/')[2]}: {message}")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)

        return _guarded(handler, check)


def _guarded(handler: grpc.RpcMethodHandler, check) -> grpc.RpcMethodHandler:
    """Return `handler` with `check(context)` awaited before its behaviour runs."""
    if handler.unary_unary is not None:
        kind, behaviour, make = "unary_unary", handler.unary_unary, grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream is not None:
        kind, behaviour, make = "unary_stream", handler.unary_stream, grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary is not None:
        kind, behaviour, make = "stream_unary", handler.stream_unary, grpc.stream_unary_rpc_method_handler
    else:
        kind, behaviour, make = "stream_stream", handler.stream_stream, grpc.stream_stream_rpc_method_handler

    if inspect.isasyncgenfunction(behaviour):
        async def guarded(request, context):
            await check(context)
            async for item in behaviour(request, context):
                yield item
    else:
        async def guarded(request, context):
            await check(context)
            return await behaviour(request, context)

    guarded.__name__ = f"guarded_{kind}"
    return make(guarded, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
