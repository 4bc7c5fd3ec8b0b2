"""Waiting for units to reach a state, for start, stop, load and unload."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from fleetkit.cli.client import ControlClient
from fleetkit.cli.output import machine_legend

POLL_INTERVAL = 0.25

# Target states: the systemd ActiveState values that satisfy each verb.
STOPPED_ACTIVE_STATES = frozenset({"inactive", "failed"})


@dataclass
class Outcome:
    """The state of one unit's wait (done, failed, pending or timeout) and the line to print for it."""

    name: str
    status: str
    line: str


def _evaluate(verb: str, record, states_by_machine: dict[str, object], ips: dict[str, str]) -> Outcome:
    name = record.name
    machines = list(record.machines)
    if verb == "unload":
        if not machines and not states_by_machine:
            return Outcome(name, "done", f"Unit {name} unloaded")
        return Outcome(name, "pending", f"{name}: still loaded on {', '.join(sorted(states_by_machine)) or 'its machine'}")
    if not machines:
        if record.desired_state == "inactive":
            return Outcome(name, "failed", f"{name}: desired state is inactive")
        if record.unplaceable_reason:
            return Outcome(name, "pending", f"{name}: cannot be placed yet: {record.unplaceable_reason}")
        if getattr(record, "global"):
            return Outcome(name, "pending", f"{name}: global unit applies to no machine yet")
        return Outcome(name, "pending", f"{name}: waiting to be scheduled")

    waiting = []
    for machine in machines:
        state = states_by_machine.get(machine)
        legend = machine_legend(machine, ips.get(machine, ""), full=False)
        if state is None:
            waiting.append(f"not reported by {legend}")
            continue
        if verb == "start":
            if state.active == "failed":
                return Outcome(name, "failed", f"Unit {name} failed on {legend} ({state.active}/{state.sub})")
            if state.active != "active":
                waiting.append(f"{state.active}/{state.sub} on {legend}")
        elif verb == "stop":
            if state.active not in STOPPED_ACTIVE_STATES:
                waiting.append(f"{state.active}/{state.sub} on {legend}")
        elif verb == "load":
            if state.load != "loaded":
                waiting.append(f"{state.load or 'not loaded'} on {legend}")
    if waiting:
        return Outcome(name, "pending", f"{name}: {'; '.join(waiting)}")

    where = ", ".join(machine_legend(machine, ips.get(machine, ""), full=False) for machine in machines)
    word = {"start": "launched", "stop": "loaded", "load": "loaded"}[verb]
    return Outcome(name, "done", f"Unit {name} {word} on {where}")


async def wait_for(client: ControlClient, verb: str, names: list[str], *, timeout: float, progress: bool) -> list[Outcome]:
    """Poll until every unit reached the state of `verb`, one failed, or `timeout` (0 = forever) passed.

    Interrupting the wait (Ctrl-C) changes nothing in the cluster: the units
    keep the desired state that was already written.
    """
    try:
        return await _poll(client, verb, names, timeout=timeout, progress=progress)
    except asyncio.CancelledError:
        if progress:
            sys.stderr.write("\n")
        sys.stderr.write(
            f"stopped waiting; the desired state of {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} "
            "is already stored, see fleetkit list-unit-files\n"
        )
        raise


async def _poll(client: ControlClient, verb: str, names: list[str], *, timeout: float, progress: bool) -> list[Outcome]:
    deadline = None if timeout <= 0 else time.monotonic() + timeout
    outcomes: dict[str, Outcome] = {}
    while True:
        records = {record.name: record for record in await client.units(names)}
        states = await client.unit_states()
        ips = {state.machine: state.machine_ip for state in states}
        for name in names:
            record = records.get(name)
            if record is None:
                if verb == "unload":
                    outcomes[name] = Outcome(name, "done", f"Unit {name} unloaded")
                else:
                    outcomes[name] = Outcome(name, "failed", f"{name}: unit not found")
                continue
            by_machine = {state.machine: state for state in states if state.unit == name}
            outcomes[name] = _evaluate(verb, record, by_machine, ips)

        pending = [outcome for outcome in outcomes.values() if outcome.status == "pending"]
        if progress:
            done = sum(1 for outcome in outcomes.values() if outcome.status == "done")
            detail = f"; {pending[0].line}" if pending else ""
            sys.stderr.write(f"\r\033[Kwaiting for {verb}: {done}/{len(names)} done{detail}"[:200])
            sys.stderr.flush()
        if not pending:
            break
        if deadline is not None and time.monotonic() >= deadline:
            for outcome in pending:
                outcome.status = "timeout"
                outcome.line = f"timed out after {timeout:g}s waiting for {outcome.line}"
            break
        await asyncio.sleep(POLL_INTERVAL)

    if progress:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()
    return [outcomes[name] for name in names]
