"""The verdict of ``fleetkit cluster status``: how far a transport migration has come.

A cluster moves from ``etcd-watch`` through ``hybrid`` to ``grpc`` one node at
a time. The current stage is the earliest mode that some node still runs.
The next stage may start when every node's build can run it and every agent
is connected to the leader (and, before ``grpc``, every agent already uses
gRPC); the findings name each node that keeps it from moving on.

Warnings do not hold a stage back: they name nodes whose certificates expire
within ``[tls] expiry_warning`` of the daemon that answers.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

from fleetkit.core.durations import format_duration
from fleetkit.core.nodes import NodeRecord, parse_version

STAGES = ("etcd-watch", "hybrid", "grpc")


@dataclass
class NodeView:
    """What is known about one machine: its record in storage and its agent's connection to the leader."""

    machine: str
    record: NodeRecord | None = None
    connected: bool = False
    transport_in_use: str = ""
    seconds_since_contact: float = 0.0


@dataclass
class Verdict:
    ready: bool
    next_stage: str
    findings: list[str] = field(default_factory=list)


def judge(nodes: list[NodeView], leader: str) -> Verdict:
    """Return whether the cluster may go on to its next transport stage, and why."""
    findings: list[str] = []
    if not leader:
        findings.append("no leader is elected, so no agent is connected; check the daemons and the store")
    missing = sorted(node.machine for node in nodes if node.record is None)
    if missing:
        findings.append(f"no node record for {', '.join(missing)}: their daemons are stopped or cannot reach the store")
    disconnected = sorted(node.machine for node in nodes if not node.connected)
    if leader and disconnected:
        findings.append(f"agents not connected to the leader: {', '.join(disconnected)}")

    versions: dict[str, list[str]] = {}
    for node in nodes:
        if node.record is not None:
            versions.setdefault(node.record.version, []).append(node.machine)
    if len(versions) > 1:
        parts = [f"{version} on {', '.join(sorted(machines))}"
                 for version, machines in sorted(versions.items(), key=lambda item: parse_version(item[0]))]
        findings.append(f"versions differ ({'; '.join(parts)}): a rolling upgrade is in progress")

    advertised = [node for node in nodes if node.record is not None]
    current = _current_stage(advertised)
    next_stage = "" if current == STAGES[-1] else STAGES[STAGES.index(current) + 1]
    if next_stage:
        lacking = sorted(node.machine for node in advertised if next_stage not in node.record.transports)
        if lacking:
            findings.append(f"nodes whose fleetkit cannot run {next_stage}: {', '.join(lacking)}; upgrade them first")
        if next_stage == "grpc":
            off_grpc = sorted(node.machine for node in nodes if node.connected and node.transport_in_use != "grpc")
            if off_grpc:
                findings.append(f"agents not on grpc yet: {', '.join(off_grpc)}")
    else:
        off_grpc = sorted(node.machine for node in nodes if node.connected and node.transport_in_use != "grpc")
        if off_grpc:
            findings.append(f"agents not on grpc: {', '.join(off_grpc)}")

    ready = not findings
    if ready:
        findings.append(
            f"every node can run {next_stage} and every agent is connected: ready to move to {next_stage}"
            if next_stage else "every node and agent uses grpc: no transport migration is pending"
        )
    return Verdict(ready=ready, next_stage=next_stage, findings=findings)


def _current_stage(nodes: list[NodeView]) -> str:
    """Return the earliest stage whose mode some node still runs."""
    if not nodes:
        return STAGES[0]
    indexes = [STAGES.index(node.record.mode) for node in nodes if node.record.mode in STAGES]
    return STAGES[min(indexes)] if indexes else STAGES[0]


def certificate_warnings(records: list[NodeRecord], window: float, now: float | None = None) -> list[str]:
    """Return one warning per node whose earliest certificate expires within `window` seconds, or has expired."""
    now = time.time() if now is None else now
    warnings = []
    for record in sorted(records, key=lambda item: item.machine):
        expires = record.certificate_expires
        if not expires or expires - now > window:
            continue
        when = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        if expires <= now:
            warnings.append(f"{record.machine}: a certificate expired on {when}; issue a new one with fleetkit "
                            "tls issue and replace the file on that node")
        else:
            left = format_duration(max(60.0, round((expires - now) / 3600) * 3600 or 60.0))
            warnings.append(f"{record.machine}: a certificate expires in {left}, on {when}; issue a new one with "
                            "fleetkit tls issue and replace the file on that node, which reloads it")
    return warnings
