"""The control API that every daemon serves on ``[api] listen``.

Writes (submit, desired state, destroy) go straight to storage, so any
daemon can take them. Unit states and machines are transient and live in
the leader's engine: a daemon that does not lead asks the leader for them.
A request with invalid input is rejected whole, before anything is written.

On a unix socket, file permissions decide who may call: the owner, and the
group ``[api] socket_group`` if set. On TCP the listener is a
`fleetkit.core.listener.GrpcListener`: with TLS, admin certificates may call
everything and read-only certificates may list and show.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os

import grpc

from fleetkit.core import keys
from fleetkit.core.cluster_status import NodeView, certificate_warnings, judge
from fleetkit.core.config import Config
from fleetkit.core.credentials import ListenerSecurity, open_channel
from fleetkit.core.election import read_leader
from fleetkit.core.listener import GrpcListener
from fleetkit.core.nodes import read_nodes
from fleetkit.core.errors import StorageError, StorageUnavailable, UnitError
from fleetkit.core.states import current_state
from fleetkit.core.storage import Storage
from fleetkit.core.transport import EngineHost
from fleetkit.core.units import DESIRED_STATES, Unit, UnitName, instance_from_template, make_unit
from fleetkit.core.tls import TlsError
from fleetkit.plugins.grpc_transport import cluster_state_to_pb, state_from_pb
from fleetkit.rpc import control_pb2 as pb
from fleetkit.rpc import control_pb2_grpc as pb_grpc
from fleetkit.rpc import transport_pb2, transport_pb2_grpc

log = logging.getLogger(__name__)

LEADER_QUERY_TIMEOUT = 5.0
# Unit writes of one request in flight at once.
MAX_WRITES_IN_FLIGHT = 64
# Above this many names, one listing of all units is cheaper than a read per name.
LIST_INSTEAD_OF_GETS = 16
# Order of desired states: a creating verb never lowers a unit's desired state.
STATE_RANK = {state: rank for rank, state in enumerate(DESIRED_STATES)}


class ControlServicer(pb_grpc.ControlServicer):
    """Implements the Control service on top of storage and the engine host."""

    def __init__(self, storage: Storage, host: EngineHost, hooks=None, *,
                 transport_security: ListenerSecurity | None = None, expiry_warning: float = 30 * 86400.0):
        self._storage = storage
        self._expiry_warning = expiry_warning
        self._host = host
        self._hooks = hooks
        # How this daemon dials the leader's transport listener for unit states.
        self._transport_security = transport_security or ListenerSecurity("transport.listen", None, True)

    # -- writes ------------------------------------------------------------

    async def SubmitUnits(self, request, context):  # noqa: N802 - gRPC method name
        desired_state = request.desired_state or "inactive"
        if desired_state not in STATE_RANK:
            await _abort_invalid(context, [f"desired state {desired_state!r} is invalid; use one of {', '.join(DESIRED_STATES)}"])

        stored = await self._guard(context, self._read_units([source.name for source in request.units]))
        prepared: list[tuple[str, Unit, int, str]] = []
        problems: list[str] = []
        results: list[pb.UnitResult] = []
        for source in request.units:
            try:
                outcome = await self._prepare(source, stored, desired_state, request.replace)
            except UnitError as error:
                message = str(error)
                problems.append(message if message.startswith(source.name) else f"{source.name}: {message}")
                continue
            if isinstance(outcome, pb.UnitResult):
                results.append(outcome)
            else:
                prepared.append(outcome)
        problems.extend(self._policy_problems([unit for _name, unit, _revision, _verb in prepared]))
        if problems:
            await _abort_invalid(context, problems)

        limit = asyncio.Semaphore(MAX_WRITES_IN_FLIGHT)

        async def write(name: str, unit: Unit, revision: int, verb: str) -> pb.UnitResult:
            async with limit:
                written = await self._storage.compare_and_swap(
                    keys.unit_key(name), unit.to_json(), expected_revision=revision,
                )
            if written is None:
                return pb.UnitResult(name=name, outcome="skipped", message="changed concurrently; retry")
            return pb.UnitResult(name=name, outcome=verb)

        written = await self._guard(context, asyncio.gather(*(write(*item) for item in prepared)))
        results.extend(written)
        return pb.UnitResults(results=_in_request_order(request.units, results))

    def _policy_problems(self, units: list[Unit]) -> list[str]:
        """Return what the plugins' fleetkit_validate_unit hooks reject, one line per problem."""
        if self._hooks is None:
            return []
        problems = []
        for unit in units:
            try:
                answers = self._hooks.hook.fleetkit_validate_unit(unit=unit)
            except Exception as error:
                log.exception("a plugin failed in fleetkit_validate_unit for %s", unit.name)
                problems.append(f"{unit.name}: a unit policy plugin failed ({error}); see the daemon log")
                continue
            for found in answers:
                problems.extend(f"{unit.name}: {problem}" for problem in found or ())
        return problems

    async def _prepare(self, source, stored: dict, desired_state: str, replace: bool):
        name = UnitName.parse(source.name)
        if name.is_template and desired_state != "inactive":
            raise UnitError(f"template units can only be submitted, not loaded or started; start an instance such as {name.prefix}@1.{name.suffix}")

        existing = stored.get(source.name)
        if existing is not None:
            unit, revision = existing
            if source.unit_file:
                candidate = make_unit(source.name, source.unit_file, unit.desired_state)
                if candidate.hash != unit.hash:
                    if not replace:
                        return pb.UnitResult(
                            name=source.name, outcome="unchanged",
                            message="the local file differs from the stored unit; pass --replace to replace it",
                        )
                    new_state = max(desired_state, unit.desired_state, key=STATE_RANK.__getitem__)
                    return (source.name, make_unit(source.name, source.unit_file, new_state), revision, "replaced")
            if STATE_RANK[desired_state] > STATE_RANK[unit.desired_state]:
                return (source.name, make_unit(source.name, unit.text, desired_state), revision, "updated")
            return pb.UnitResult(name=source.name, outcome="unchanged")

        if source.unit_file:
            return (source.name, make_unit(source.name, source.unit_file, desired_state), 0, "created")
        if name.is_instance:
            template = stored.get(name.template)
            if template is None:
                template = await self._read_one(name.template)
            if template is not None:
                return (source.name, instance_from_template(template[0], source.name, desired_state), 0, "created")
        raise UnitError(
            f"unit {source.name} is not stored and no unit file for it was sent; pass the path of an existing unit file"
        )

    async def SetDesiredState(self, request, context):  # noqa: N802 - gRPC method name
        if request.desired_state not in STATE_RANK:
            await _abort_invalid(context, [f"desired state {request.desired_state!r} is invalid; use one of {', '.join(DESIRED_STATES)}"])
        stored = await self._guard(context, self._read_units(list(request.names)))
        results = []
        for name in request.names:
            existing = stored.get(name)
            if existing is None:
                results.append(pb.UnitResult(name=name, outcome="not_found", message=f"unit {name} not found"))
                continue
            unit, revision = existing
            if unit.desired_state == request.desired_state:
                results.append(pb.UnitResult(name=name, outcome="unchanged"))
                continue
            try:
                updated = make_unit(name, unit.text, request.desired_state)
            except UnitError as error:
                results.append(pb.UnitResult(name=name, outcome="invalid", message=str(error)))
                continue
            written = await self._guard(
                context, self._storage.compare_and_swap(keys.unit_key(name), updated.to_json(), expected_revision=revision),
            )
            outcome = "updated" if written is not None else "skipped"
            results.append(pb.UnitResult(name=name, outcome=outcome))
        return pb.UnitResults(results=results)

    async def DestroyUnits(self, request, context):  # noqa: N802 - gRPC method name
        results = []
        for name in request.names:
            deleted = await self._guard(context, self._storage.delete(keys.unit_key(name)))
            if deleted:
                results.append(pb.UnitResult(name=name, outcome="destroyed"))
            else:
                results.append(pb.UnitResult(name=name, outcome="not_found", message=f"unit {name} not found"))
        return pb.UnitResults(results=results)

    # -- reads -------------------------------------------------------------

    async def GetUnits(self, request, context):  # noqa: N802 - gRPC method name
        if request.names:
            stored = await self._guard(context, self._read_units(list(request.names)))
        else:
            stored = await self._guard(context, self._read_all_units())
        schedule_items, _ = await self._guard(context, self._storage.list(keys.SCHEDULE))
        schedule = {keys.name_from_key(keys.SCHEDULE, item.key): item.value.decode() for item in schedule_items}
        cluster = await self._cluster_state_or_none()

        reply = pb.UnitList()
        for name in sorted(stored):
            unit, _revision = stored[name]
            record = pb.UnitRecord(
                name=name, unit_file=unit.text, hash=unit.hash, desired_state=unit.desired_state,
                description=unit.unit_file.description(), **{"global": unit.options.is_global},
            )
            states = _states_of(cluster, name)
            if unit.options.is_global:
                record.machines.extend(sorted(states))
            elif name in schedule:
                record.machines.append(schedule[name])
            machine_states = [states.get(machine) for machine in record.machines]
            record.current_state = _combined_current_state(machine_states) if record.machines else "inactive"
            if cluster is not None and name in cluster.unplaceable:
                record.unplaceable_reason = cluster.unplaceable[name]
            reply.units.append(record)
        return reply

    async def ListUnitStates(self, request, context):  # noqa: N802 - gRPC method name
        cluster = await self._require_cluster_state(context)
        stored = await self._guard(context, self._read_all_units())
        reply = pb.UnitStateList()
        rows = []
        for machine in cluster.machines:
            for state in machine.units:
                unit = stored.get(state.name)
                rows.append(pb.UnitStateRecord(
                    unit=state.name, machine=machine.machine.id, machine_ip=machine.machine.ip, hash=state.hash,
                    load=state.load_state, active=state.active_state, sub=state.sub_state,
                    desired=unit[0].desired_state if unit else "",
                ))
        rows.sort(key=lambda row: (row.unit, row.machine))
        reply.states.extend(rows)
        return reply

    async def ListMachines(self, request, context):  # noqa: N802 - gRPC method name
        cluster = await self._require_cluster_state(context)
        reply = pb.MachineList()
        for machine in cluster.machines:
            reply.machines.append(pb.MachineRecord(
                machine=machine.machine.id, ip=machine.machine.ip, metadata=dict(machine.machine.metadata),
                version=machine.machine.version, connected=machine.connected,
                seconds_since_contact=machine.seconds_since_contact,
            ))
        return reply

    async def GetClusterStatus(self, request, context):  # noqa: N802 - gRPC method name
        records = await self._guard(context, read_nodes(self._storage))
        found = await self._guard(context, read_leader(self._storage))
        leader = found[0].machine if found else ""
        cluster = await self._cluster_state_or_none()
        views = {machine: NodeView(machine=machine, record=record) for machine, record in records.items()}
        for machine in cluster.machines if cluster is not None else ():
            view = views.setdefault(machine.machine.id, NodeView(machine=machine.machine.id))
            view.connected = machine.connected
            view.transport_in_use = machine.transport if machine.connected else ""
            view.seconds_since_contact = machine.seconds_since_contact
        verdict = judge(sorted(views.values(), key=lambda view: view.machine), leader)

        reply = pb.ClusterStatus(leader=leader, ready=verdict.ready, next_stage=verdict.next_stage,
                                 findings=verdict.findings,
                                 warnings=certificate_warnings(list(records.values()), self._expiry_warning))
        for view in sorted(views.values(), key=lambda view: view.machine):
            record = view.record
            reply.nodes.append(pb.NodeStatus(
                machine=view.machine, version=record.version if record else "",
                transports=list(record.transports) if record else [], engine=bool(record and record.engine),
                transport_in_use=view.transport_in_use, connected=view.connected,
                seconds_since_contact=view.seconds_since_contact, leader=view.machine == leader,
                advertised=record is not None, mode=record.mode if record else "",
                tls=bool(record and record.tls), certificate_expires=record.certificate_expires if record else 0.0,
            ))
        return reply

    # -- helpers -----------------------------------------------------------

    async def _read_one(self, name: str) -> tuple[Unit, int] | None:
        item = await self._storage.get(keys.unit_key(name))
        if item is None:
            return None
        return Unit.from_json(item.value), item.mod_revision

    async def _read_units(self, names: list[str]) -> dict[str, tuple[Unit, int]]:
        wanted = list(dict.fromkeys(names))
        if len(wanted) > LIST_INSTEAD_OF_GETS:
            everything = await self._read_all_units()
            return {name: everything[name] for name in wanted if name in everything}
        records = await asyncio.gather(*(self._read_one(name) for name in wanted))
        return {name: record for name, record in zip(wanted, records) if record is not None}

    async def _read_all_units(self) -> dict[str, tuple[Unit, int]]:
        items, _ = await self._storage.list(keys.UNITS)
        found = {}
        for item in items:
            try:
                found[keys.name_from_key(keys.UNITS, item.key)] = (Unit.from_json(item.value), item.mod_revision)
            except (UnitError, ValueError, KeyError) as error:
                log.error("ignoring unreadable unit record %s: %s", item.key, error)
        return found

    async def _guard(self, context, awaitable):
        """Await a storage call, turning store failures into UNAVAILABLE with the reason."""
        try:
            return await awaitable
        except StorageUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"storage is unreachable: {error}")
        except StorageError as error:
            await context.abort(grpc.StatusCode.INTERNAL, f"storage error: {error}")

    async def _cluster_state(self) -> transport_pb2.ClusterState:
        engine = self._host.engine
        if engine is not None:
            return cluster_state_to_pb(self._host.machine_id, engine)
        found = await read_leader(self._storage)
        if found is None:
            raise LookupError("no leader is elected yet; unit states and machines are known only to the leader")
        record, _revision = found
        channel = open_channel(record.address, self._transport_security, peer_tls=record.tls,
                               peer_plaintext=record.plaintext)
        async with channel:
            stub = transport_pb2_grpc.AgentTransportStub(channel)
            return await stub.GetClusterState(transport_pb2.ClusterStateRequest(), timeout=LEADER_QUERY_TIMEOUT)

    async def _cluster_state_or_none(self):
        try:
            return await self._cluster_state()
        except (LookupError, StorageError, TlsError, grpc.aio.AioRpcError) as error:
            log.debug("cluster state not available: %s", error)
            return None

    async def _require_cluster_state(self, context):
        try:
            return await self._cluster_state()
        except (LookupError, TlsError) as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        except StorageUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"storage is unreachable: {error}")
        except grpc.aio.AioRpcError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the leader did not answer: {error.details()}")


def _states_of(cluster, unit_name: str) -> dict:
    if cluster is None:
        return {}
    return {
        machine.machine.id: state
        for machine in cluster.machines
        for state in machine.units
        if state.name == unit_name
    }


def _combined_current_state(states: list) -> str:
    """Return the lowest current state over the machines a unit applies to."""
    values = [current_state(state_from_pb(state)) if state is not None else "inactive" for state in states]
    return min(values, key=STATE_RANK.__getitem__)


def _in_request_order(sources, results: list[pb.UnitResult]) -> list[pb.UnitResult]:
    order = {source.name: index for index, source in enumerate(sources)}
    return sorted(results, key=lambda result: order.get(result.name, len(order)))


async def _abort_invalid(context, problems: list[str]) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "\n".join(problems))


class ApiServer:
    """The control API of one daemon on ``[api] listen``.

    Construction loads the listener's certificates, so a daemon with broken
    TLS files fails before it starts anything.
    """

    def __init__(self, config: Config, storage: Storage, host: EngineHost, hooks=None):
        self.listen = config.api.listen
        self.socket_group = config.api.socket_group
        self.servicer = ControlServicer(
            storage, host, hooks, transport_security=ListenerSecurity.of(config, "transport"),
            expiry_warning=config.tls.expiry_warning)
        self.listener: GrpcListener | None = None
        if not self.listen.startswith("unix://"):
            self.listener = GrpcListener(
                self.listen, ListenerSecurity.of(config, "api"), self._register, what="control API",
                reload_interval=config.tls.reload_interval, state_dir=config.node.state_dir,
            )

    def _register(self, server: grpc.aio.Server) -> None:
        pb_grpc.add_ControlServicer_to_server(self.servicer, server)

    async def serve(self) -> None:
        """Serve until cancelled."""
        if self.listener is not None:
            await self.listener.serve()
            return
        path = self.listen[len("unix://"):]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = grpc.aio.server()
        self._register(server)
        # Bind with a umask that leaves the socket to its owner from the start;
        # the group, if any, is granted afterwards.
        previous = os.umask(0o177)
        try:
            bound = server.add_insecure_port(f"unix:{path}")
        finally:
            os.umask(previous)
        if bound == 0:
            raise OSError(f"cannot listen on api.listen = {self.listen!r}; is the address in use?")
        await server.start()
        if self.socket_group:
            os.chown(path, -1, grp.getgrnam(self.socket_group).gr_gid)
            os.chmod(path, 0o660)
            who = f"its owner and group {self.socket_group}"
        else:
            os.chmod(path, 0o600)
            who = "its owner only"
        log.info("control API listening on %s (usable by %s)", self.listen, who)
        try:
            await server.wait_for_termination()
        finally:
            await server.stop(grace=1.0)
