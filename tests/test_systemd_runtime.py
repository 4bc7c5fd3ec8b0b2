"""Tests of SystemdRuntime against a real systemd user manager and dbus-daemon."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleetkit.core.errors import RuntimeBackendError
from fleetkit.core.runtime import UnitStatus
from fleetkit.plugins.systemd import SystemdRuntime, _JobTracker
from fleetkit.plugins.systemd_dbus import escape_path_label, unit_name_from_path, unit_path
from fleetkit.testing.systemd import user_manager, user_manager_factory  # noqa: F401  (fixtures)
from fleetkit.usermanager import UserManager

SLEEPER = "[Unit]\nDescription=fleetkit test sleeper\n\n[Service]\nExecStart=/bin/sleep 3600\n"


@pytest.fixture
async def runtime(user_manager: UserManager) -> AsyncIterator[SystemdRuntime]:
    runtime = SystemdRuntime(user_manager.bus_address, user_manager.unit_directory)
    await runtime.connect()
    yield runtime
    await runtime.close()


def _systemctl_show(manager: UserManager, unit: str, prop: str) -> str:
    completed = subprocess.run(
        ["systemctl", "--user", "show", f"--property={prop}", "--value", unit],
        env={**os.environ, **manager.env()},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


async def _next_matching(stream, name: str, active_state: str, timeout: float = 20.0) -> UnitStatus:
    async with asyncio.timeout(timeout):
        async for status in stream:
            if status.name == name and status.active_state == active_state:
                return status
    raise AssertionError(f"status stream ended before {name} became {active_state}")


def test_unit_path_round_trips_escaped_name():
    name = "fk-web@1.2.service"

    path = unit_path(name)

    assert path == "/org/freedesktop/systemd1/unit/fk_2dweb_401_2e2_2eservice"
    assert unit_name_from_path(path) == name
    assert escape_path_label("") == "_"
    assert unit_name_from_path("/org/freedesktop/systemd1/job/12") is None


async def test_start_three_units_reports_active(runtime: SystemdRuntime, user_manager: UserManager):
    names = [f"fk-three-{i}.service" for i in range(3)]
    await runtime.install({name: (SLEEPER, f"hash{i}") for i, name in enumerate(names)})

    results = await runtime.start(names)
    statuses = await runtime.statuses(names)

    assert results == {name: "done" for name in names}
    assert {name: (s.load_state, s.active_state, s.sub_state) for name, s in statuses.items()} == {
        name: ("loaded", "active", "running") for name in names
    }
    for name in names:
        assert _systemctl_show(user_manager, name, "ActiveState") == "active"


async def test_status_changes_yield_active_then_inactive(runtime: SystemdRuntime):
    await runtime.install({"fk-watched.service": (SLEEPER, "h")})
    stream = runtime.status_changes()
    try:
        await runtime.start(["fk-watched.service"])
        active = await _next_matching(stream, "fk-watched.service", "active")

        await runtime.stop(["fk-watched.service"])
        inactive = await _next_matching(stream, "fk-watched.service", "inactive")
    finally:
        await stream.aclose()

    assert (active.load_state, active.sub_state) == ("loaded", "running")
    assert inactive.sub_state == "dead"


async def test_installed_units_ignore_foreign_files(runtime: SystemdRuntime, user_manager: UserManager):
    await runtime.install({"fk-a.service": (SLEEPER, "aaa"), "fk-b.service": (SLEEPER, "bbb")})
    Path(user_manager.unit_directory, "foreign.service").write_text(SLEEPER)

    installed = await runtime.installed_units()

    assert installed == {"fk-a.service": "aaa", "fk-b.service": "bbb"}
    first_line = Path(user_manager.unit_directory, "fk-a.service").read_text().splitlines()[0]
    assert first_line == "# fleetkit: hash=aaa"


async def test_install_over_foreign_file_raises(runtime: SystemdRuntime, user_manager: UserManager):
    Path(user_manager.unit_directory).mkdir(parents=True, exist_ok=True)
    foreign = Path(user_manager.unit_directory, "foreign.service")
    foreign.write_text(SLEEPER)

    with pytest.raises(RuntimeBackendError, match="not written by fleetkit"):
        await runtime.install({"foreign.service": (SLEEPER, "h"), "fk-other.service": (SLEEPER, "h")})

    assert foreign.read_text() == SLEEPER
    assert not Path(user_manager.unit_directory, "fk-other.service").exists()


async def test_uninstall_removes_only_fleetkit_files(runtime: SystemdRuntime, user_manager: UserManager):
    await runtime.install({"fk-gone.service": (SLEEPER, "h")})
    foreign = Path(user_manager.unit_directory, "foreign.service")
    foreign.write_text(SLEEPER)

    await runtime.uninstall(["fk-gone.service", "foreign.service"])

    assert await runtime.installed_units() == {}
    assert foreign.exists()
    statuses = await runtime.statuses(["fk-gone.service"])
    assert statuses["fk-gone.service"].load_state == "not-found"


async def test_start_failing_unit_reports_failed(runtime: SystemdRuntime):
    failing = "[Service]\nType=oneshot\nExecStart=/bin/false\n"
    await runtime.install({"fk-fails.service": (failing, "h")})

    results = await runtime.start(["fk-fails.service"])
    statuses = await runtime.statuses(["fk-fails.service"])

    assert results == {"fk-fails.service": "failed"}
    assert statuses["fk-fails.service"].active_state == "failed"


async def test_start_unknown_unit_reports_rejected(runtime: SystemdRuntime):
    results = await runtime.start(["fk-missing.service"])

    assert results == {"fk-missing.service": "rejected"}


async def test_stop_unloaded_unit_reports_done(runtime: SystemdRuntime):
    results = await runtime.stop(["fk-never-loaded.service"])

    assert results == {"fk-never-loaded.service": "done"}


async def test_start_200_units_all_active(runtime: SystemdRuntime):
    names = [f"fk-load-{i:03d}.service" for i in range(200)]
    began = time.monotonic()

    await runtime.install({name: (SLEEPER, "h") for name in names})
    installed = time.monotonic()
    results = await runtime.start(names)
    started = time.monotonic()
    statuses = await runtime.statuses(names)

    print(
        f"\n200 units: install+reload {installed - began:.2f} s, start {started - installed:.2f} s, "
        f"max calls in flight {runtime.statistics()['max_calls_in_flight']}"
    )
    assert set(results.values()) == {"done"}
    assert sorted(s.name for s in statuses.values() if s.active_state == "active") == names
    assert 1 < runtime.statistics()["max_calls_in_flight"] <= 64


async def test_second_connection_adopts_running_unit(runtime: SystemdRuntime, user_manager: UserManager):
    await runtime.install({"fk-adopt.service": (SLEEPER, "adopt-hash")})
    await runtime.start(["fk-adopt.service"])
    pid_before = await runtime.main_pid("fk-adopt.service")
    await runtime.close()

    second = SystemdRuntime(user_manager.bus_address, user_manager.unit_directory)
    await second.connect()
    try:
        installed = await second.installed_units()
        statuses = await second.statuses(installed)
        pid_after = await second.main_pid("fk-adopt.service")
    finally:
        await second.close()

    assert installed == {"fk-adopt.service": "adopt-hash"}
    assert statuses["fk-adopt.service"].active_state == "active"
    assert pid_before > 0
    assert pid_after == pid_before


async def test_calls_raise_after_bus_loss(runtime: SystemdRuntime, user_manager: UserManager):
    stream = runtime.status_changes()

    await user_manager.stop()
    async with asyncio.timeout(20):
        await runtime.wait_closed()

    with pytest.raises(RuntimeBackendError, match="not connected"):
        await runtime.statuses(["fk-any.service"])
    # Events queued during the shutdown may come first; the stream then raises.
    with pytest.raises(RuntimeBackendError):
        async with asyncio.timeout(5):
            async for _status in stream:
                pass


async def test_connect_to_missing_bus_raises(tmp_path):
    runtime = SystemdRuntime(f"unix:path={tmp_path}/no-bus", str(tmp_path / "units"))

    with pytest.raises(RuntimeBackendError, match="cannot connect"):
        await runtime.connect()


async def test_job_result_before_reply_is_kept():
    tracker = _JobTracker()
    tracker.begin_call()
    tracker.job_removed("/org/freedesktop/systemd1/job/7", "done")
    future = tracker.register("/org/freedesktop/systemd1/job/7")
    tracker.end_call()

    assert future.done()
    assert future.result() == "done"
    assert tracker.waiting == 0
