"""The fleetctl-style verbs: submit, load, start, stop, unload, destroy, cat, status and the listings."""

from __future__ import annotations

import datetime
import json
import os
import sys

from fleetkit.cli.client import ControlClient
from fleetkit.cli.output import (
    UsageError,
    machine_legend,
    metadata_text,
    parse_fields,
    render,
    render_table,
    short_hash,
)
from fleetkit.cli.wait import wait_for
from fleetkit.core.errors import ApiError
from fleetkit.core.units import UnitName, mangle_unit_name

UNIT_FIELDS = ("unit", "machine", "active", "sub", "load", "hash", "desired")
UNIT_DEFAULT = ("unit", "machine", "active", "sub")
UNIT_FILE_FIELDS = ("unit", "hash", "dstate", "state", "target", "global", "desc")
UNIT_FILE_DEFAULT = ("unit", "hash", "dstate", "state", "target")
MACHINE_FIELDS = ("machine", "ip", "metadata", "version", "connected")
MACHINE_DEFAULT = ("machine", "ip", "metadata")

# Desired state written by each creating verb.
CREATING_VERBS = {"submit": "inactive", "load": "loaded", "start": "launched"}
FAILED_OUTCOMES = frozenset({"not_found", "invalid", "skipped"})


def read_unit_sources(arguments: list[str]) -> list[tuple[str, str]]:
    """Return (unit name, file text or "") for each argument.

    A path that exists is read; for an instance such as ``web@3.service`` a
    template file ``web@.service`` beside the argument is used; otherwise the
    text is empty and the daemon uses the stored unit or template.
    """
    sources = []
    for argument in arguments:
        name = mangle_unit_name(argument)
        UnitName.parse(name)
        text = ""
        if os.path.isfile(argument):
            text = _read(argument)
        else:
            parsed = UnitName.parse(name)
            if parsed.is_instance:
                template_path = os.path.join(os.path.dirname(argument), parsed.template)
                if os.path.isfile(template_path):
                    text = _read(template_path)
        sources.append((name, text))
    return sources


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read unit file {path}: {error}", exit_code=1) from error


def _about(result) -> str:
    """Return the result's message, prefixed with the unit name unless the message already names it."""
    message = result.message or result.outcome
    return message if result.name in message else f"{result.name}: {message}"


def _report(results, *, quiet_outcomes=("unchanged",)) -> int:
    """Print one line per non-trivial result; return 1 when any failed."""
    status = 0
    for result in results:
        if result.outcome in FAILED_OUTCOMES:
            print(f"error: {_about(result)}", file=sys.stderr)
            status = 1
        elif result.message:
            print(f"warning: {_about(result)}", file=sys.stderr)
        elif result.outcome not in quiet_outcomes:
            print(f"Unit {result.name} {result.outcome}", file=sys.stderr)
    return status


async def _block(client, verb: str, names: list[str], args) -> int:
    if not names:
        return 0
    if args.no_block:
        for name in names:
            print(f"Triggered unit {name} {verb}")
        return 0
    outcomes = await wait_for(client, verb, names, timeout=args.block_timeout, progress=sys.stderr.isatty())
    status = 0
    for outcome in outcomes:
        if outcome.status == "done":
            print(outcome.line)
        else:
            print(f"error: {outcome.line}", file=sys.stderr)
            status = 1
    return status


async def create(client: ControlClient, verb: str, args) -> int:
    sources = read_unit_sources(args.units)
    try:
        results = await client.submit(sources, CREATING_VERBS[verb], replace=args.replace)
    except ApiError as error:
        missing = [argument for argument in args.units if os.sep in argument and not os.path.exists(argument)]
        if missing and error.code == "INVALID_ARGUMENT":
            notes = "".join(f"\nnote: the file {path} does not exist" for path in missing)
            raise ApiError(f"{error}{notes}", code=error.code) from None
        raise
    status = _report(results, quiet_outcomes=("unchanged", "created", "updated", "replaced") if verb != "submit" else ("unchanged",))
    if verb == "submit":
        return status
    names = [result.name for result in results if result.outcome not in FAILED_OUTCOMES]
    names = [name for name in names if not UnitName.parse(name).is_template]
    return max(status, await _block(client, verb, names, args))


async def set_state(client: ControlClient, verb: str, args) -> int:
    names = [mangle_unit_name(argument) for argument in args.units]
    desired = {"stop": "loaded", "unload": "inactive"}[verb]
    results = await client.set_desired_state(names, desired)
    status = _report(results, quiet_outcomes=("unchanged", "updated"))
    waiting = [result.name for result in results if result.outcome not in FAILED_OUTCOMES]
    return max(status, await _block(client, verb, waiting, args))


async def destroy(client: ControlClient, args) -> int:
    names = [mangle_unit_name(argument) for argument in args.units]
    results = await client.destroy(names)
    status = 0
    for result in results:
        if result.outcome == "destroyed":
            print(f"Destroyed {result.name}")
        else:
            print(f"error: {_about(result)}", file=sys.stderr)
            status = 1
    return status


async def cat(client: ControlClient, args) -> int:
    name = mangle_unit_name(args.unit)
    units = await client.units([name])
    if not units:
        print(f"error: unit {name} not found", file=sys.stderr)
        return 1
    sys.stdout.write(units[0].unit_file)
    return 0


async def status(client: ControlClient, args) -> int:
    names = [mangle_unit_name(argument) for argument in args.units]
    units = {unit.name: unit for unit in await client.units(names)}
    states = await client.unit_states()
    result = 0
    for name in names:
        unit = units.get(name)
        if unit is None:
            print(f"error: unit {name} not found", file=sys.stderr)
            result = 1
            continue
        print(f"● {name}" + (f" - {unit.description}" if unit.description else ""))
        print(f"     Desired: {unit.desired_state}   Current: {unit.current_state}")
        print(f"        Hash: {unit.hash}")
        if unit.unplaceable_reason:
            print(f"     Problem: cannot be placed: {unit.unplaceable_reason}")
        on_machines = [state for state in states if state.unit == name]
        if not on_machines:
            where = ", ".join(unit.machines) or "no machine"
            print(f"     Machine: {where} (no state reported)")
        for state in on_machines:
            print(f"     Machine: {machine_legend(state.machine, state.machine_ip, full=True)}")
            print(f"      Loaded: {state.load or '-'}")
            print(f"      Active: {state.active or '-'} ({state.sub or '-'})")
        print()
    return result


async def list_units(client: ControlClient, args) -> int:
    fields = parse_fields(args.fields, UNIT_FIELDS, UNIT_DEFAULT)
    states = await client.unit_states()
    rows, records = [], []
    for state in states:
        rows.append({
            "unit": state.unit,
            "machine": machine_legend(state.machine, state.machine_ip, full=args.full),
            "active": state.active, "sub": state.sub, "load": state.load,
            "hash": short_hash(state.hash, full=args.full), "desired": state.desired,
        })
        records.append({
            "unit": state.unit, "machine": state.machine, "machine_ip": state.machine_ip, "load": state.load,
            "active": state.active, "sub": state.sub, "desired": state.desired, "hash": state.hash,
        })
    render(rows, records, fields=fields, output=args.output, legend=not args.no_legend)
    return 0


async def list_unit_files(client: ControlClient, args) -> int:
    fields = parse_fields(args.fields, UNIT_FILE_FIELDS, UNIT_FILE_DEFAULT)
    units = await client.units()
    rows, records = [], []
    for unit in units:
        is_global = getattr(unit, "global")
        if is_global:
            target = "global"
        else:
            target = unit.machines[0] if unit.machines else "-"
            if target != "-" and not args.full and len(target) > 8:
                target = target[:8] + "..."
        rows.append({
            "unit": unit.name, "hash": short_hash(unit.hash, full=args.full), "dstate": unit.desired_state,
            "state": unit.current_state, "target": target,
            "global": "true" if is_global else "false", "desc": unit.description or "-",
        })
        records.append({
            "unit": unit.name, "hash": unit.hash, "desired": unit.desired_state, "state": unit.current_state,
            "global": is_global, "machines": list(unit.machines), "description": unit.description,
            "unplaceable_reason": unit.unplaceable_reason,
        })
    render(rows, records, fields=fields, output=args.output, legend=not args.no_legend)
    return 0


async def list_machines(client: ControlClient, args) -> int:
    fields = parse_fields(args.fields, MACHINE_FIELDS, MACHINE_DEFAULT)
    machines = await client.machines()
    rows, records = [], []
    for machine in machines:
        metadata = dict(machine.metadata)
        rows.append({
            "machine": machine.machine if args.full or len(machine.machine) <= 8 else machine.machine[:8] + "...",
            "ip": machine.ip or "-", "metadata": metadata_text(metadata), "version": machine.version or "-",
            "connected": "yes" if machine.connected else "no",
        })
        records.append({
            "machine": machine.machine, "ip": machine.ip, "metadata": metadata, "version": machine.version,
            "connected": machine.connected,
        })
    render(rows, records, fields=fields, output=args.output, legend=not args.no_legend)
    return 0


def print_json(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _iso_time(seconds: float) -> str | None:
    """Return a UTC time such as "2027-12-04T10:00:00Z" for seconds since the epoch, or None for 0."""
    if not seconds:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def cluster_status(client: ControlClient, args) -> int:
    """Print each node's version, transports and contact, then the migration verdict."""
    status = await client.cluster_status()
    if args.output == "json":
        print_json({
            "leader": status.leader, "ready": status.ready, "next_stage": status.next_stage,
            "findings": list(status.findings), "warnings": list(status.warnings),
            "nodes": [{
                "machine": node.machine, "version": node.version, "transports": list(node.transports),
                "engine": node.engine, "transport_in_use": node.transport_in_use, "connected": node.connected,
                "seconds_since_contact": round(node.seconds_since_contact, 1), "leader": node.leader,
                "advertised": node.advertised, "mode": node.mode, "tls": node.tls,
                "certificate_expires": _iso_time(node.certificate_expires),
            } for node in status.nodes],
        })
    else:
        rows = [{
            "machine": node.machine + (" *" if node.leader else ""),
            "version": node.version or "-",
            "mode": node.mode or "-",
            "in-use": node.transport_in_use or "-",
            "can-run": ",".join(node.transports) or "-",
            "engine": "yes" if node.engine else "no",
            "contact": f"{node.seconds_since_contact:.1f}s ago" if node.connected else "not connected",
            "tls": (f"until {_iso_time(node.certificate_expires)[:10]}" if node.tls and node.certificate_expires
                    else "yes" if node.tls else "no"),
        } for node in status.nodes]
        print(render_table(rows, ("machine", "version", "mode", "in-use", "engine", "contact", "tls", "can-run"),
                           legend=True))
        print()
        print(f"leader: {status.leader or 'none'} (marked *)")
        verdict = "ready" if status.ready else "not ready"
        stage = f" for {status.next_stage}" if status.next_stage else ""
        print(f"verdict: {verdict}{stage}")
        for finding in status.findings:
            print(f"  - {finding}")
        if status.warnings:
            print("warnings:")
            for warning in status.warnings:
                print(f"  - {warning}")
    return 1 if args.check and not status.ready else 0
