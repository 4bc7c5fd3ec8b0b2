#!/usr/bin/env python3
"""How fast do N units start? fleetkit against the D-Bus floor and per-unit systemctl.

Usage (as root, from the repository root)::

    python benchmarks/start_units.py --units 500
    python benchmarks/start_units.py --units 500 --ways fleetkit,dbus --json

Every way starts the same N units, ``bench-1.service`` .. ``bench-N.service``,
each ``[Service]`` with ``ExecStart=/bin/sleep 3600``, on a fresh real
``systemd --user`` manager of its own (`fleetkit.usermanager`), so no way
inherits loaded units or jobs from another:

fleetkit
    One etcd and one ``fleetkit daemon`` (`fleetkit.testing.cluster`), then a
    single ``fleetkit start --no-block`` with all N unit file paths; the CLI
    sends them in one request.
dbus
    The floor: the N files are written into the manager's runtime unit
    directory, one ``Reload``, then ``StartUnit`` for every unit, at most 64
    calls in flight (`fleetkit.plugins.systemd.SystemdRuntime`).
systemctl
    The old way: per unit, one after the other, ``systemctl --user link FILE``,
    ``systemctl --user daemon-reload`` and ``systemctl --user start UNIT``.
    ``--systemctl-units K`` runs it on the first K units only; the time for N
    is then an estimate and is labelled so.

Time zero is taken just before the first action of a way (the CLI call, the
first file write, the first ``systemctl link``). A unit's time-to-active runs
from time zero to systemd's own record of the unit entering the active state
(``ActiveEnterTimestampMonotonic``). That is CLOCK_MONOTONIC, which the
benchmark reads too, because the managers run in a mount namespace only.
An observer child process, subscribed before time zero on a D-Bus connection
of its own, detects when every unit is active. By default it follows
``PropertiesChanged`` signals and checks ListUnitsByNames every second as a
safety net (``--observe signals``). With ``--observe poll`` it polls
ListUnitsByNames every 50 ms instead.

Needs root (the user managers run in private mount namespaces), etcd
(Debian package etcd-server) and systemd 252 or later. Nothing leaves
127.0.0.1; every process the benchmark starts is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

UNIT_TEXT = "[Service]\nExecStart=/bin/sleep 3600\n"
WAYS = ("fleetkit", "dbus", "systemctl")
PERCENTILES = (50, 85, 99)
POLL_INTERVAL = 0.05
SAFETY_POLL_INTERVAL = 1.0
OBSERVER_READY_TIMEOUT = 30.0
CLUSTER_READY_TIMEOUT = 60.0
SYSTEMCTL_CALL_TIMEOUT = 120.0
# Figures of fleet v1.0 on a machine of this kind, 500 units on one node, as given to this project.
FLEET_REFERENCE = {
    "floor (D-Bus)": "1.6 s",
    "fleet, gRPC registry": "6.6 s",
    "fleet, etcd registry": "8.0-8.5 s",
    "per-unit systemctl": "167 s",
}


def unit_names(count: int) -> list[str]:
    return [f"bench-{index}.service" for index in range(1, count + 1)]


# -- observer (runs as a child process) ------------------------------------


async def observe(bus: str, names_file: str, mode: str, timeout: float) -> int:
    """Print ``READY``, then ``<monotonic seconds> <S|P> <unit>`` per unit the first time it is active.

    S means the unit was seen through a PropertiesChanged signal, P through
    ListUnitsByNames. A lost connection is reported as ``RECONNECT`` and made
    again. Ends with ``DONE`` when every unit was seen, or ``TIMEOUT`` after
    `timeout` seconds.
    """
    from fleetkit.core.errors import RuntimeBackendError
    from fleetkit.plugins.systemd import SystemdRuntime

    names = Path(names_file).read_text().split()
    pending = set(names)
    done = asyncio.Event()

    def seen(name: str, source: str) -> None:
        if name in pending:
            pending.discard(name)
            sys.stdout.write(f"{time.monotonic():.6f} {source} {name}\n")
            sys.stdout.flush()
            if not pending:
                done.set()

    async def watch(runtime: SystemdRuntime) -> None:
        """Follow one connection until it is lost (raises RuntimeBackendError) or every unit was seen."""
        stream = runtime.status_changes() if mode == "signals" else None

        async def poll(interval: float) -> None:
            while pending:
                for status in (await runtime.statuses(sorted(pending))).values():
                    if status.active_state == "active":
                        seen(status.name, "P")
                await asyncio.sleep(interval)

        async def follow() -> None:
            async for status in stream:
                if status.active_state == "active":
                    seen(status.name, "S")

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(poll(POLL_INTERVAL if mode == "poll" else SAFETY_POLL_INTERVAL))
                if stream is not None:
                    group.create_task(follow())
                await done.wait()
                raise _AllSeen
        except* _AllSeen:
            pass
        finally:
            if stream is not None:
                await stream.aclose()

    async def connect() -> SystemdRuntime:
        # The unit directory is never written through this connection.
        runtime = SystemdRuntime(bus, "/nonexistent")
        for _ in range(100):
            try:
                await runtime.connect()
                return runtime
            except RuntimeBackendError:
                await asyncio.sleep(0.1)
        await runtime.connect()
        return runtime

    runtime = await connect()
    try:
        already = [s.name for s in (await runtime.statuses(names)).values() if s.active_state == "active"]
    except RuntimeBackendError as error:
        print(f"ERROR {error}", flush=True)
        return 1
    if already:
        print(f"ERROR {len(already)} units are active before the run, e.g. {already[0]}", flush=True)
        return 1
    print("READY", flush=True)
    try:
        async with asyncio.timeout(timeout):
            while pending:
                try:
                    await watch(runtime)
                except* RuntimeBackendError as errors:
                    print(f"RECONNECT {errors.exceptions[0]}", flush=True)
                    await runtime.close()
                    runtime = await connect()
        print("DONE", flush=True)
    except TimeoutError:
        print(f"TIMEOUT {len(pending)} units not active", flush=True)
    finally:
        await runtime.close()
    return 0


class _AllSeen(Exception):
    """Ends an observer's task group once every unit was seen."""


class Observer:
    """The parent's handle on an observer child process."""

    def __init__(self, bus: str, names: list[str], mode: str, timeout: float, work_dir: Path):
        self.bus = bus
        self.names = names
        self.mode = mode
        self.timeout = timeout
        self.names_file = work_dir / "observer-names.txt"
        self.names_file.write_text("\n".join(names) + "\n")
        self.process: asyncio.subprocess.Process | None = None
        self.active_at: dict[str, float] = {}
        self.sources = {"S": 0, "P": 0}
        self.reconnects: list[str] = []
        self.outcome = ""

    async def start(self, env: dict[str, str]) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--observe-child", self.bus, str(self.names_file), self.mode, str(self.timeout),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, env=env,
        )
        async with asyncio.timeout(OBSERVER_READY_TIMEOUT):
            line = (await self.process.stdout.readline()).decode().strip()
        if line != "READY":
            raise RuntimeError(f"the observer process failed to start: {line or 'no output'}; check that the user manager is running")

    async def wait(self) -> None:
        """Read until the child reports DONE or TIMEOUT (it bounds itself by `timeout`)."""
        async with asyncio.timeout(self.timeout + 30):
            while True:
                line = (await self.process.stdout.readline()).decode().strip()
                if not line or line.startswith(("DONE", "TIMEOUT")):
                    self.outcome = line or "observer exited"
                    break
                if line.startswith("RECONNECT"):
                    self.reconnects.append(line)
                    continue
                stamp, source, name = line.split()
                self.active_at[name] = float(stamp)
                self.sources[source] += 1
            await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(10):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


# -- results ---------------------------------------------------------------


@dataclass
class WayResult:
    way: str
    units: int
    ran_units: int
    total_s: float | None = None
    percentiles_s: dict[str, float] = field(default_factory=dict)
    max_s: float | None = None
    active: int = 0
    observed_by: str = ""
    estimate_total_s: float | None = None
    estimate_method: str = ""
    phases_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str = ""


def nearest_rank(sorted_values: list[float], percent: float) -> float:
    rank = max(1, math.ceil(percent / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def active_enter_times(env: dict[str, str], names: list[str]) -> dict[str, float]:
    """Return systemd's own CLOCK_MONOTONIC time (seconds) at which each active unit entered the active state."""
    found: dict[str, float] = {}
    for first in range(0, len(names), 256):
        chunk = names[first : first + 256]
        process = await asyncio.create_subprocess_exec(
            "systemctl", "--user", "show", "-p", "Id,ActiveState,ActiveEnterTimestampMonotonic", *chunk, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(SYSTEMCTL_CALL_TIMEOUT):
            stdout, stderr = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(
                f"systemctl --user show failed with exit status {process.returncode}: {stderr.decode().strip()}; "
                "rerun with --keep and read the manager.log of this way"
            )
        for block in stdout.decode().split("\n\n"):
            fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            stamp = int(fields.get("ActiveEnterTimestampMonotonic", "0") or 0)
            if fields.get("ActiveState") == "active" and stamp:
                found[fields["Id"]] = stamp / 1e6
    return found


async def summarize(result: WayResult, observer: Observer, t0: float, env: dict[str, str]) -> None:
    """Fill in the figures from systemd's activation timestamps.

    The observer only detects when every unit is active, because systemd's
    signals lag the state by up to 0.6 s during a burst of starts.
    """
    signals, polls = observer.sources["S"], observer.sources["P"]
    if observer.mode == "signals":
        result.observed_by = (
            f"completion seen through PropertiesChanged signals ({signals} units) and a ListUnitsByNames check "
            f"every {SAFETY_POLL_INTERVAL:.0f} s ({polls} units); per-unit times are systemd's ActiveEnterTimestampMonotonic"
        )
    else:
        result.observed_by = (
            f"completion seen by ListUnitsByNames every {POLL_INTERVAL * 1000:.0f} ms; "
            "per-unit times are systemd's ActiveEnterTimestampMonotonic"
        )

    if observer.active_at:
        result.phases_s["last_unit_seen_by_observer"] = round(max(observer.active_at.values()) - t0, 3)
    if observer.reconnects:
        result.notes.append(
            f"the observer lost its D-Bus connection {len(observer.reconnects)} time(s) and reconnected: {observer.reconnects[0][:200]}"
        )

    entered = await active_enter_times(env, observer.names)
    times = sorted(stamp - t0 for stamp in entered.values())
    result.active = len(times)
    if not times:
        result.error = result.error or f"no unit became active ({observer.outcome})"
        return
    if times[0] < 0:
        result.notes.append(f"a unit entered active {-times[0]:.3f} s before time zero; the clocks disagree")
    result.percentiles_s = {f"p{p}": round(nearest_rank(times, p), 3) for p in PERCENTILES}
    result.max_s = round(times[-1], 3)
    if result.active == result.ran_units:
        result.total_s = result.max_s
    else:
        result.error = result.error or f"only {result.active} of {result.ran_units} units became active ({observer.outcome})"


# -- the three ways --------------------------------------------------------


def write_unit_files(directory: Path, names: list[str]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = directory / name
        path.write_text(UNIT_TEXT)
        paths.append(str(path))
    return paths


async def run_fleetkit(names: list[str], work: Path, args) -> WayResult:
    from fleetkit.testing.cluster import TestCluster
    from fleetkit.testing.etcd import EtcdServer

    result = WayResult("fleetkit", len(names), len(names))
    paths = write_unit_files(work / "files", names)
    etcd = EtcdServer(work / "etcd")
    cluster = None
    observer = None
    try:
        etcd.start()
        cluster = TestCluster(work / "c", etcd.client_url)
        node = await cluster.add_node("n1", {})
        await cluster.start()
        await wait_for_machine(cluster)

        observer = Observer(node.manager.bus_address, names, args.observe, args.timeout, work)
        await observer.start({**os.environ, **node.manager.env()})
        wall0 = time.time()
        t0 = time.monotonic()
        cli = await cluster.cli("start", "--no-block", *paths, timeout=args.timeout)
        result.phases_s["cli_returned"] = round(time.monotonic() - t0, 3)
        if cli.code != 0:
            result.error = f"fleetkit start failed with exit status {cli.code}: {cli.stderr.strip()[-500:]}"
            return result
        await observer.wait()
        await summarize(result, observer, t0, {**os.environ, **node.manager.env()})
        result.phases_s.update(daemon_phases(node.log_path, wall0))
        if result.error:
            result.notes.append("daemon log tail:\n" + node.log_tail(15))
        return result
    finally:
        if observer is not None:
            await observer.stop()
        if cluster is not None:
            await cluster.close()
        etcd.stop()


async def wait_for_machine(cluster) -> None:
    """Wait until the leader's engine lists the one machine as connected."""
    deadline = time.monotonic() + CLUSTER_READY_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        reply = await cluster.cli("list-machines", "--output", "json", timeout=30)
        last = reply.stderr.strip() or reply.stdout.strip()
        if reply.code == 0:
            try:
                machines = json.loads(reply.stdout)
            except ValueError:
                machines = []
            if machines and all(machine.get("connected") for machine in machines):
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the cluster did not list a connected machine within {CLUSTER_READY_TIMEOUT:.0f} s: {last}\n{cluster.logs()}")


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+\s+(\S+): (.*)$")


def daemon_phases(log_path: Path, wall0: float) -> dict[str, float]:
    """Seconds after time zero of the daemon's reconcile and converge log lines."""
    phases: dict[str, float] = {}
    reconciles = converges = 0
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return phases
    for line in lines:
        match = _LOG_LINE.match(line)
        if not match:
            continue
        stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
        offset = round(stamp - wall0, 3)
        if offset < -0.001:
            continue
        logger_name, message = match.group(3), match.group(4)
        if logger_name.endswith("engine") and message.startswith("reconcile:") and "no changes" not in message:
            reconciles += 1
            phases.setdefault("first_reconcile_with_changes", offset)
            phases["last_reconcile_with_changes"] = offset
        elif logger_name.endswith("agent") and message.startswith("converged:"):
            converges += 1
            phases.setdefault("first_agent_converge_done", offset)
            phases["last_agent_converge_done"] = offset
    phases["reconcile_passes_with_changes"] = reconciles
    phases["agent_converge_passes"] = converges
    return phases


async def run_dbus(names: list[str], work: Path, args) -> WayResult:
    from fleetkit.plugins.systemd import SystemdRuntime
    from fleetkit.usermanager import start_user_manager

    result = WayResult("dbus", len(names), len(names))
    digest = hashlib.sha256(UNIT_TEXT.encode()).hexdigest()
    manager = await start_user_manager(str(work), name="m")
    observer = None
    runtime = None
    try:
        runtime = SystemdRuntime(manager.bus_address, manager.unit_directory)
        await runtime.connect()
        observer = Observer(manager.bus_address, names, args.observe, args.timeout, work)
        await observer.start({**os.environ, **manager.env()})
        t0 = time.monotonic()
        await runtime.install({name: (UNIT_TEXT, digest) for name in names})
        result.phases_s["files_written_and_reloaded"] = round(time.monotonic() - t0, 3)
        jobs = await runtime.start(names)
        result.phases_s["all_start_jobs_done"] = round(time.monotonic() - t0, 3)
        failed = {name: job for name, job in jobs.items() if job != "done"}
        if failed:
            result.notes.append(f"{len(failed)} start jobs did not finish with done, e.g. {next(iter(failed.items()))}")
        await observer.wait()
        await summarize(result, observer, t0, {**os.environ, **manager.env()})
        return result
    finally:
        if observer is not None:
            await observer.stop()
        if runtime is not None:
            await runtime.close()
        await manager.stop()


async def systemctl(env: dict[str, str], *arguments: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "systemctl", "--user", *arguments, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(SYSTEMCTL_CALL_TIMEOUT):
            _, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"systemctl --user {' '.join(arguments)} timed out after {SYSTEMCTL_CALL_TIMEOUT:.0f} s") from None
    if process.returncode != 0:
        raise RuntimeError(
            f"systemctl --user {' '.join(arguments)} failed with exit status {process.returncode}: {stderr.decode().strip()}"
        )


async def systemctl_with_retry(env: dict[str, str], *arguments: str, attempts: int = 3) -> int:
    """Run a systemctl command, retrying after a failure, and return the number of retries.

    The manager's bus can drop during a reload (see docs/benchmarks.md, known gaps).
    """
    for attempt in range(attempts):
        try:
            await systemctl(env, *arguments)
            return attempt
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2)
    return attempts


async def run_systemctl(names: list[str], work: Path, args) -> WayResult:
    from fleetkit.usermanager import start_user_manager

    count = min(args.systemctl_units or len(names), len(names))
    ran = names[:count]
    result = WayResult("systemctl", len(names), count)
    paths = write_unit_files(work / "files", ran)
    manager = await start_user_manager(str(work), name="m")
    env = {**os.environ, **manager.env()}
    observer = None
    per_unit: list[float] = []
    retries = 0
    try:
        observer = Observer(manager.bus_address, ran, args.observe, args.timeout, work)
        await observer.start(env)
        t0 = time.monotonic()
        deadline = t0 + args.timeout
        for name, path in zip(ran, paths):
            if time.monotonic() > deadline:
                result.error = f"stopped after {len(per_unit)} units: --timeout {args.timeout:.0f} s reached"
                break
            began = time.monotonic()
            for command in (("link", path), ("daemon-reload",), ("start", name)):
                retries += await systemctl_with_retry(env, *command)
            per_unit.append(time.monotonic() - began)
        result.phases_s["last_systemctl_start_returned"] = round(time.monotonic() - t0, 3)
        if retries:
            result.notes.append(f"{retries} systemctl command(s) failed once and were run again")
        if per_unit:
            result.phases_s["first_unit_commands"] = round(per_unit[0], 3)
            result.phases_s["last_unit_commands"] = round(per_unit[-1], 3)
        await observer.wait()
        await summarize(result, observer, t0, env)
        if count < len(names) and len(per_unit) == count:
            result.estimate_total_s, result.estimate_method = extrapolate(per_unit, len(names))
        return result
    finally:
        if observer is not None:
            await observer.stop()
        await manager.stop()


def extrapolate(per_unit: list[float], target: int) -> tuple[float, str]:
    """Fit time per unit as a + b*i (reloads slow down as units accumulate) and sum it for i = 1..target."""
    n = len(per_unit)
    if n < 2:
        return round(per_unit[0] * target, 1), f"linear from {n} unit"
    xs = range(1, n + 1)
    mean_x = (n + 1) / 2
    mean_y = sum(per_unit) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, per_unit)) / sxx
    a = mean_y - b * mean_x
    total = sum(max(0.0, a + b * i) for i in range(1, target + 1))
    return round(total, 1), (
        f"ESTIMATE from {n} units: per-unit time fitted as {a * 1000:.1f} ms + {b * 1000:.3f} ms x units so far, summed to {target}"
    )


# -- machine and report ----------------------------------------------------


def first_line(command: list[str]) -> str:
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    return output.strip().splitlines()[0] if output.strip() else "unknown"


def machine_info() -> dict[str, str]:
    model = "unknown"
    memory = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        dbus_fast = version("dbus-fast")
    except Exception:  # noqa: BLE001 - only for the report
        dbus_fast = "unknown"
    from fleetkit import __version__

    os_name = "unknown"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": memory,
        "os": f"{os_name}, kernel {platform.release()}",
        "systemd": first_line(["systemctl", "--version"]),
        "etcd": first_line([shutil.which("etcd") or "/usr/bin/etcd", "--version"]),
        "python": platform.python_version(),
        "fleetkit": __version__,
        "dbus-fast": dbus_fast,
    }


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def print_report(info: dict[str, str], results: list[WayResult], args) -> None:
    print("machine:")
    for key, value in info.items():
        print(f"  {key:10} {value}")

    print()
    print(f"{args.units} units, [Service] ExecStart=/bin/sleep 3600; time-to-active from time zero of each way")
    header = f"{'way':10} {'units':>5} {'total':>10} {'p50':>9} {'p85':>9} {'p99':>9} {'max':>9}"
    print(header)
    print("-" * len(header))
    for result in results:
        p = result.percentiles_s
        print(
            f"{result.way:10} {result.ran_units:>5} {seconds(result.total_s):>10} {seconds(p.get('p50')):>9} "
            f"{seconds(p.get('p85')):>9} {seconds(p.get('p99')):>9} {seconds(result.max_s):>9}"
        )

    print()
    for result in results:
        print(f"{result.way}:")
        if result.observed_by:
            print(f"  observed by  {result.observed_by}")
        for name, value in result.phases_s.items():
            print(f"  {name:32} {value}")
        if result.ran_units < result.units:
            print(f"  ran on {result.ran_units} of {result.units} units (--systemctl-units {result.ran_units})")
        if result.estimate_total_s is not None:
            print(f"  ESTIMATE for {result.units} units: {result.estimate_total_s:.0f} s ({result.estimate_method})")
        for note in result.notes:
            print(f"  note: {note}")
        if result.error:
            print(f"  ERROR: {result.error}")

    ratio = fleetkit_ratio(results)
    if ratio is not None:
        print()
        print(f"fleetkit / floor: {ratio:.2f}x (target: 1.5x or less) -> {'met' if ratio <= 1.5 else 'MISSED'}")
    print()
    print("fleet v1.0 on a machine of this kind, 500 units, for comparison:")
    for name, value in FLEET_REFERENCE.items():
        print(f"  {name:22} {value}")


def fleetkit_ratio(results: list[WayResult]) -> float | None:
    by_way = {result.way: result for result in results}
    fleetkit, floor = by_way.get("fleetkit"), by_way.get("dbus")
    if fleetkit and floor and fleetkit.total_s and floor.total_s:
        return fleetkit.total_s / floor.total_s
    return None


# -- main ------------------------------------------------------------------


RUNNERS = {"fleetkit": run_fleetkit, "dbus": run_dbus, "systemctl": run_systemctl}


async def run(args) -> int:
    names = unit_names(args.units)
    info = machine_info()
    results = []
    for way in args.ways:
        # Short: the bus socket path must stay under 108 bytes.
        work = Path(tempfile.mkdtemp(prefix="fkb-"))
        print(f"running {way} ...", file=sys.stderr, flush=True)
        try:
            result = await RUNNERS[way](names, work, args)
        except Exception as error:  # noqa: BLE001 - one way failing must not hide the others
            result = WayResult(way, len(names), len(names), error=f"{type(error).__name__}: {error}")
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"  kept {work}", file=sys.stderr)
        print(f"  {way}: total {seconds(result.total_s)}{'  ERROR ' + result.error if result.error else ''}", file=sys.stderr, flush=True)
        results.append(result)
    if args.json:
        print(json.dumps({
            "units": args.units, "observe": args.observe, "machine": info,
            "results": [asdict(result) for result in results],
            "fleetkit_over_floor": fleetkit_ratio(results), "fleet_reference": FLEET_REFERENCE,
        }, indent=2))
    else:
        print_report(info, results, args)
    return 1 if any(result.error for result in results) else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Measure how fast N units start: fleetkit, raw D-Bus, per-unit systemctl.")
    parser.add_argument("--units", type=int, default=500, help="units to start (default: 500)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated ways to run (default: {','.join(WAYS)})")
    parser.add_argument(
        "--systemctl-units", type=int, default=0, metavar="K",
        help="run the systemctl way on the first K units only and estimate the time for all (default: all units)",
    )
    parser.add_argument(
        "--observe", choices=("signals", "poll"), default="signals",
        help="how to see units become active: PropertiesChanged signals or polling every 50 ms (default: signals)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per way (default: 600)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the working directories (logs) of each way")
    args = parser.parse_args(argv)
    args.ways = [way.strip() for way in args.ways.split(",") if way.strip()]
    unknown = [way for way in args.ways if way not in WAYS]
    if unknown or not args.ways:
        parser.error(f"unknown way {', '.join(unknown) or '(none)'}; use some of {','.join(WAYS)}")
    if args.units < 1:
        parser.error("--units must be at least 1")
    if args.systemctl_units < 0:
        parser.error("--systemctl-units must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--observe-child"]:
        bus, names_file, mode, timeout = argv[1:5]
        return asyncio.run(observe(bus, names_file, mode, float(timeout)))
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("error: root is needed: each way starts a systemd user manager in a private mount namespace", file=sys.stderr)
        return 2
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
