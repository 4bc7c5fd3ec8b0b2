"""Tests of the launcher for private systemd user managers, against real systemd and dbus-daemon."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fleetkit.core.errors import FleetkitError
from fleetkit.plugins.systemd import SystemdRuntime
from fleetkit.testing.systemd import user_manager, user_manager_factory  # noqa: F401  (fixtures)
from fleetkit.usermanager import UserManager, start_user_manager


def _running(pid: int) -> bool:
    """Return True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _systemctl(manager: UserManager, *args: str) -> str:
    completed = subprocess.run(
        ["systemctl", "--user", *args],
        env={**os.environ, **manager.env()},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


async def test_start_reaches_running(user_manager: UserManager):
    state = _systemctl(user_manager, "show", "--property=SystemState", "--value").strip()

    assert state in ("running", "degraded")
    assert user_manager.systemd_pid
    assert all(_running(pid) for pid in user_manager.pids)
    assert os.stat(user_manager.runtime_dir).st_mode & 0o777 == 0o700
    assert user_manager.bus_address == f"unix:path={user_manager.runtime_dir}/bus"


async def test_stop_leaves_no_started_process(user_manager: UserManager):
    runtime = SystemdRuntime(user_manager.bus_address, user_manager.unit_directory)
    await runtime.connect()
    await runtime.install({"sleeper.service": ("[Service]\nExecStart=/bin/sleep 3600\n", "h")})
    assert await runtime.start(["sleeper.service"]) == {"sleeper.service": "done"}
    unit_pid = await runtime.main_pid("sleeper.service")
    await runtime.close()
    started = list(user_manager.pids)
    assert unit_pid > 0
    assert _running(unit_pid)

    await user_manager.stop()

    assert [pid for pid in [*started, unit_pid] if _running(pid)] == []


async def test_stop_sync_leaves_no_started_process(user_manager: UserManager):
    started = list(user_manager.pids)

    user_manager.stop_sync()

    assert len(started) == 2
    assert [pid for pid in started if _running(pid)] == []


async def test_factory_starts_separate_managers(user_manager_factory):
    first = await user_manager_factory("alpha")
    second = await user_manager_factory("beta")

    assert first.bus_address != second.bus_address
    assert first.systemd_pid != second.systemd_pid
    for manager in (first, second):
        assert _systemctl(manager, "show", "--property=SystemState", "--value").strip() in ("running", "degraded")


async def test_async_with_stops_manager(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("um", numbered=True)
    # A short directory keeps the socket path under the unix socket limit.
    async with await start_user_manager(str(base_dir), name="m") as manager:
        started = list(manager.pids)
        assert all(_running(pid) for pid in started)

    assert [pid for pid in started if _running(pid)] == []


async def test_start_without_root_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    with pytest.raises(FleetkitError, match="root is needed"):
        await start_user_manager(str(tmp_path), name="m")


async def test_managers_do_not_share_units(user_manager_factory):
    first = await user_manager_factory("first")
    second = await user_manager_factory("second")
    runtimes = []
    for manager in (first, second):
        runtime = SystemdRuntime(manager.bus_address, manager.unit_directory)
        await runtime.connect()
        await runtime.install({"same.service": ("[Service]\nExecStart=/bin/sleep 3600\n", "h")})
        assert await runtime.start(["same.service"]) == {"same.service": "done"}
        runtimes.append(runtime)
    first_pid = await runtimes[0].main_pid("same.service")

    await runtimes[1].stop(["same.service"])
    await runtimes[1].close()
    await second.stop()
    status = await runtimes[0].statuses(["same.service"])
    pid_after = await runtimes[0].main_pid("same.service")
    await runtimes[0].close()

    assert status["same.service"].active_state == "active"
    assert pid_after == first_pid
    assert all(not os.path.exists(cgroup) for cgroup in second.cgroups)
