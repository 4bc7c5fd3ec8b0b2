"""Start thousands of units on four agents with each transport, side by side, and print what it cost.

Run with ``python benchmarks/transports.py --units 3000``. For each of
``grpc``, ``etcd-watch`` and ``hybrid`` it starts a fresh etcd and four
``fleetkit daemon`` processes on loopback whose runtime is the simulated
service manager (`fleetkit.testing.simruntime`): units never run a
process, so the figures measure fleetkit and etcd, not systemd. One
``fleetkit start --no-block`` submits every unit; the time of each unit is
from that call until the simulated manager marked it active. Storage
operations come from etcd's own counters (``/metrics``), CPU seconds from
``/proc``. Every figure is printed; nothing is asserted. ``--tls`` runs
every listener with mutual TLS, to measure what the TLS gate costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

from fleetkit.cli.devcluster import etcd_storage_section, free_port, issue_dev_certificates, node_config
from fleetkit.testing.etcd import EtcdServer

AGENTS = 4
TRANSPORTS = ("grpc", "etcd-watch", "hybrid")
COUNTERS = {
    "put": "etcd_mvcc_put_total", "delete": "etcd_mvcc_delete_total",
    "txn": "etcd_mvcc_txn_total", "range": "etcd_mvcc_range_total",
}


def etcd_counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for name, metric in COUNTERS.items():
        values[name] = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(metric + " "))
    return values


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(fraction * len(ordered))) - 1))]


async def cli(endpoint: str, *args: str, timeout: float = 300) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetkit", "--endpoint", endpoint, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(timeout):
        output, _ = await process.communicate()
    return process.returncode, output.decode()


async def run_transport(mode: str, units: int, directory: Path, *, tls: bool = False) -> dict:
    directory.mkdir(parents=True)
    tls_dir = directory / "tls" if tls else None
    if tls_dir is not None:
        issue_dev_certificates(tls_dir, [f"n{index}" for index in range(1, AGENTS + 1)])
    etcd = EtcdServer(directory / "etcd")
    etcd.start()
    daemons = []
    try:
        journals = []
        for index in range(1, AGENTS + 1):
            name = f"n{index}"
            node_dir = directory / name
            node_dir.mkdir()
            journal = node_dir / "active.jsonl"
            journal.touch()
            journals.append(journal)
            runtime = SimpleNamespace(bus_address=f"unix:path={journal}", unit_directory=str(node_dir / "units"))
            text = node_config(directory, name, etcd_storage_section(etcd.client_url), free_port(), runtime, {},
                               lease_ttl="10s", reconcile_interval="5s", agent_ttl="30s", transport=mode,
                               tls_dir=tls_dir)
            config = node_dir / "cluster.toml"
            config.write_text(text.replace('backend = "systemd"', 'backend = "simulated"'))
            log = open(node_dir / "daemon.log", "ab")
            daemons.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "fleetkit", "daemon", "--config", str(config), "--log-level", "warning",
                stdout=log, stderr=log, start_new_session=True,
            ))
        endpoint = f"unix://{directory / 'n1' / 'fleetkit.sock'}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            code, output = await cli(endpoint, "list-machines", "--output", "json", timeout=30)
            if code == 0 and sum(1 for row in json.loads(output) if row["connected"]) == AGENTS:
                break
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError(f"{mode}: not every agent connected within 60 s")

        (directory / "bench@.service").write_text("[Service]\nExecStart=/bin/sleep 3600\n")
        arguments = [str(directory / f"bench@{index}.service") for index in range(1, units + 1)]
        before = etcd_counters(etcd.client_url)
        cpu_before = [cpu_seconds(process.pid) for process in daemons] + [cpu_seconds(etcd.pid)]
        started = time.time()
        code, output = await cli(endpoint, "start", "--no-block", *arguments)
        if code != 0:
            raise RuntimeError(f"{mode}: start failed: {output[-500:]}")

        times: dict[str, float] = {}
        deadline = time.monotonic() + 300
        while len(times) < units and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            for journal in journals:
                for line in journal.read_text().splitlines():
                    entry = json.loads(line)
                    times.setdefault(entry["unit"], entry["active_at"] - started)
        await asyncio.sleep(1)
        after = etcd_counters(etcd.client_url)
        cpu_after = [cpu_seconds(process.pid) for process in daemons] + [cpu_seconds(etcd.pid)]
        leader = await cli(endpoint, "cluster", "status", "--output", "json")
        leader_name = json.loads(leader[1])["leader"] if leader[0] == 0 else ""
        cpu = [round(b - a, 2) for a, b in zip(cpu_before, cpu_after)]
        leader_index = int(leader_name[1:]) - 1 if leader_name else 0
        values = list(times.values())
        writes = sum(after[key] - before[key] for key in ("put", "delete", "txn"))
        return {
            "transport": f"{mode}+tls" if tls else mode, "units": units, "active": len(times),
            "p50": percentile(values, 0.50), "p85": percentile(values, 0.85),
            "p99": percentile(values, 0.99), "max": max(values),
            "storage_writes_per_unit": writes / units,
            "storage_reads_per_unit": (after["range"] - before["range"]) / units,
            "cpu_engine_s": cpu[leader_index],
            "cpu_agents_s": round(sum(cpu[:AGENTS]) - cpu[leader_index], 2),
            "cpu_etcd_s": cpu[AGENTS],
        }
    finally:
        for process in daemons:
            if process.returncode is None:
                process.terminate()
        for process in daemons:
            try:
                async with asyncio.timeout(20):
                    await process.wait()
            except TimeoutError:
                process.kill()
        etcd.stop()


async def main_async(units: int, modes: list[str], *, tls: bool = False) -> list[dict]:
    base = Path(tempfile.mkdtemp(prefix="fkbt-"))
    results = []
    for mode in modes:
        label = f"{mode}+tls" if tls else mode
        print(f"running {label} with {units} units on {AGENTS} agents ...", file=sys.stderr)
        results.append(await run_transport(mode, units, base / label, tls=tls))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=3000, help="units to start (default: 3000)")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated transports")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--tls", action="store_true",
                        help="run every listener with mutual TLS (certificates made for the run)")
    args = parser.parse_args()
    modes = [mode for mode in args.transports.split(",") if mode]
    results = asyncio.run(main_async(args.units, modes, tls=args.tls))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{args.units} units on {AGENTS} agents, simulated service manager; seconds from submit to active\n")
    header = ("transport", "active", "p50", "p85", "p99", "max", "writes/unit", "reads/unit",
              "engine CPU", "agents CPU", "etcd CPU")
    print("  ".join(f"{name:>11}" for name in header))
    for row in results:
        cells = [row["transport"], str(row["active"]), *(f"{row[key]:.2f}" for key in ("p50", "p85", "p99", "max")),
                 f"{row['storage_writes_per_unit']:.2f}", f"{row['storage_reads_per_unit']:.2f}",
                 f"{row['cpu_engine_s']:.1f}", f"{row['cpu_agents_s']:.1f}", f"{row['cpu_etcd_s']:.1f}"]
        print("  ".join(f"{cell:>11}" for cell in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
