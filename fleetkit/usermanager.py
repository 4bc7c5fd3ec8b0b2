"""Launch a real ``systemd --user`` manager in a private mount namespace.

Tests and ``fleetkit dev-cluster`` use one such manager per simulated machine.
A small shell script, run under ``unshare --mount --propagation private``,
mounts a tmpfs on ``/run`` inside the namespace and creates
``/run/systemd/system`` so that systemd believes the host booted with systemd.
It then starts ``systemd --user`` as its child, records its process id, and
waits. The session bus is the manager's own socket-activated ``dbus.socket``
and ``dbus.service`` (Debian's dbus-user-session package), as on a real
machine: a second bus daemon started beside them would lose its socket to
``dbus.socket`` and drop every client when that unit restarts. The runtime directory
(``XDG_RUNTIME_DIR``, which contains the bus socket) lives outside ``/run``, so
clients outside the namespace reach the bus through the shared filesystem.

No PID namespace is used: the user manager drops D-Bus clients that live
outside its PID namespace. Starting the manager needs root (for the mount
namespace); the units then run as root too, each manager with its own
``XDG_RUNTIME_DIR`` and ``HOME``.

`UserManager.stop` signals only the processes that this module started: the
script (a session and process group leader of its own) and the two pids that
the script recorded. Each recorded pid is checked against its start time
before it is signalled, so a reused pid is never hit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import signal
import time
from pathlib import Path

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from fleetkit.core.errors import FleetkitError

logger = logging.getLogger(__name__)

SYSTEMD_CANDIDATES = ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")

_SCRIPT = """\
#!/bin/sh
# Runs inside a private mount namespace: the tmpfs on /run is invisible outside.
set -eu
mount -t tmpfs -o mode=0755 fleetkit-run /run
mkdir -p /run/systemd/system
export XDG_RUNTIME_DIR={runtime}
export HOME={home}
export DBUS_SESSION_BUS_ADDRESS=unix:path={runtime}/bus
cd "$HOME"
# Give this manager cgroups of its own. Several managers that share one cgroup
# create the same sub-cgroups (app.slice/dbus.service, ...), and stopping a
# unit in one of them then kills the same-named unit of every other manager.
for hierarchy in {cgroup_roots}; do
    [ -d "$hierarchy" ] || continue
    mkdir -p "$hierarchy/{cgroup}"
    echo $$ >"$hierarchy/{cgroup}/cgroup.procs"
done
# Mask the distribution's default user sockets and timers except the bus:
# they only add noise to a simulated machine.
masked="$HOME/.config/systemd/user"
mkdir -p "$masked"
for unit in /usr/lib/systemd/user/*.socket /usr/lib/systemd/user/*.timer \\
        /etc/systemd/user/*.socket /etc/systemd/user/*.timer; do
    [ -e "$unit" ] || continue
    case "$(basename "$unit")" in dbus.socket) continue ;; esac
    ln -sf /dev/null "$masked/$(basename "$unit")"
done
{systemd} --user >>{log} 2>&1 &
echo $! >{pids}/systemd.pid
wait
"""


class UserManagerError(FleetkitError):
    """A private systemd user manager could not be started or stopped."""


def _start_time(pid: int) -> int | None:
    """Return the kernel start time of `pid` (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and brackets, so split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class UserManager:
    """A running ``systemd --user`` with its own session bus, started by `start_user_manager`."""

    def __init__(self, name: str, base_dir: Path, process: asyncio.subprocess.Process):
        self.name = name
        self.directory = base_dir
        self.runtime_dir = str(base_dir / "runtime")
        self.home = str(base_dir / "home")
        self.log_path = str(base_dir / "manager.log")
        self.bus_address = f"unix:path={self.runtime_dir}/bus"
        self.unit_directory = os.path.join(self.runtime_dir, "systemd", "user")
        self._pid_dir = base_dir / "pids"
        self._process = process
        # Pid to start time; filled from the files the script writes.
        self._recorded: dict[str, tuple[int, int]] = {}
        self._stopped = False
        # The manager's own cgroup directories, removed once it stopped.
        self.cgroups: list[str] = []

    @property
    def script_pid(self) -> int:
        """Process id of the namespace script (also its process group id)."""
        return self._process.pid

    @property
    def systemd_pid(self) -> int:
        """Process id of ``systemd --user``, or 0 before it has started."""
        return self._recorded.get("systemd", (0, 0))[0]

    @property
    def pids(self) -> list[int]:
        """Every process id this manager started: the script and systemd (which owns the bus daemon)."""
        recorded = [pid for pid, _ in self._recorded.values()]
        return [self._process.pid, *recorded]

    def env(self) -> dict[str, str]:
        """Return the environment variables that point a client (``systemctl --user``) at this manager."""
        return {
            "XDG_RUNTIME_DIR": self.runtime_dir,
            "DBUS_SESSION_BUS_ADDRESS": self.bus_address,
            "HOME": self.home,
        }

    def log_tail(self, lines: int = 20) -> str:
        """Return the last `lines` lines of systemd's output."""
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _read_pid_files(self) -> None:
        for role in ("systemd",):
            if role in self._recorded:
                continue
            try:
                pid = int((self._pid_dir / f"{role}.pid").read_text().strip())
            except (FileNotFoundError, ValueError):
                continue
            started = _start_time(pid)
            if started is not None:
                self._recorded[role] = (pid, started)

    def _alive(self, role: str) -> bool:
        if role not in self._recorded:
            return False
        pid, started = self._recorded[role]
        return _start_time(pid) == started

    def _signal(self, role: str, signum: int) -> None:
        # The start-time check and kill are not atomic, but the pid can only be
        # reused after the script (its parent) reaped it, and that needs the
        # process to have exited, so a match here means it is still ours.
        if self._alive(role):
            pid = self._recorded[role][0]
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _script_running(self) -> bool:
        return self._process.returncode is None and _start_time(self._process.pid) is not None

    def _kill_group(self) -> None:
        # The group exists only while the unreaped script leads it, so it
        # cannot belong to anyone else.
        if self._process.returncode is None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def stop(self, *, timeout: float = 15.0) -> None:
        """Stop systemd (its units, the bus daemon among them, stop first), then the script.

        Each step waits up to `timeout` seconds before SIGKILL. Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        self._read_pid_files()

        for role in ("systemd",):
            self._signal(role, signal.SIGTERM)
            if not await self._wait_gone(lambda r=role: not self._alive(r), timeout):
                logger.warning("%s of user manager %s ignored SIGTERM for %.0f s; sending SIGKILL", role, self.name, timeout)
                self._signal(role, signal.SIGKILL)
                await self._wait_gone(lambda r=role: not self._alive(r), 5.0)

        try:
            async with asyncio.timeout(timeout):
                await self._process.wait()
        except TimeoutError:
            logger.warning("namespace script %d of user manager %s did not exit; killing its process group", self._process.pid, self.name)
            self._kill_group()
            try:
                async with asyncio.timeout(5.0):
                    await self._process.wait()
            except TimeoutError as exc:
                raise UserManagerError(
                    f"namespace script {self._process.pid} of user manager {self.name} survived SIGKILL for 5 s; "
                    "check it with ps, it may be stuck in the kernel"
                ) from exc
        for cgroup in self.cgroups:
            await asyncio.to_thread(_remove_cgroup_tree, cgroup)

    @staticmethod
    async def _wait_gone(is_gone, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_gone():
                return True
            await asyncio.sleep(0.05)
        return is_gone()

    def stop_sync(self, *, timeout: float = 10.0) -> None:
        """Stop the manager without an event loop, for atexit and signal handlers.

        Same order as `stop`, but blocking. The script is reaped with
        ``os.waitpid`` when the event loop that started it is gone.
        """
        if self._stopped:
            return
        self._stopped = True
        self._read_pid_files()

        for role in ("systemd",):
            self._signal(role, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._alive(role) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._signal(role, signal.SIGKILL)

        deadline = time.monotonic() + timeout
        while self._script_running() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._script_running():
            self._kill_group()
        try:
            os.waitpid(self._process.pid, os.WNOHANG)
        except ChildProcessError:
            # Already reaped by the event loop's child watcher.
            pass
        for cgroup in self.cgroups:
            _remove_cgroup_tree(cgroup)

    async def __aenter__(self) -> UserManager:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


def cgroup_roots() -> list[str]:
    """Return the cgroup hierarchies that systemd tracks processes in: the unified one and name=systemd."""
    if os.path.exists("/sys/fs/cgroup/cgroup.procs"):
        return ["/sys/fs/cgroup"]
    return [root for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd") if os.path.isdir(root)]


def _remove_cgroup_tree(path: str, *, timeout: float = 3.0) -> None:
    """Remove a cgroup directory and its children, deepest first, once their last processes are gone.

    The kernel empties a cgroup a moment after its last process was reaped,
    so this retries until `timeout`; a cgroup still busy then is left behind.
    """
    deadline = time.monotonic() + timeout
    while os.path.isdir(path):
        for current, _directories, _files in sorted(os.walk(path), key=lambda entry: -entry[0].count("/")):
            try:
                os.rmdir(current)
            except OSError:
                pass
        if not os.path.isdir(path) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)


USER_BUS_UNITS = ("/usr/lib/systemd/user/dbus.socket", "/lib/systemd/user/dbus.socket")


def _check_prerequisites() -> tuple[str, str]:
    if os.geteuid() != 0:
        raise UserManagerError(
            "root is needed to start a private systemd user manager (it mounts a tmpfs on /run "
            "in a new mount namespace); run as root, or point [runtime] bus at an existing manager"
        )
    unshare = shutil.which("unshare")
    if unshare is None:
        raise UserManagerError("the unshare command was not found on PATH; install util-linux")
    if shutil.which("dbus-daemon") is None:
        raise UserManagerError("the dbus-daemon command was not found on PATH; install the dbus-daemon package")
    if not any(os.path.exists(path) for path in USER_BUS_UNITS):
        raise UserManagerError(
            "the user bus units (dbus.socket, dbus.service) are missing; install the dbus-user-session package"
        )
    systemd = next((path for path in SYSTEMD_CANDIDATES if os.access(path, os.X_OK)), None)
    if systemd is None:
        raise UserManagerError(f"no systemd binary at {' or '.join(SYSTEMD_CANDIDATES)}; install the systemd package")
    return unshare, systemd


async def _query_system_state(bus_address: str) -> str:
    bus = await MessageBus(bus_address=bus_address).connect()
    try:
        reply = await bus.call(
            Message(
                destination="org.freedesktop.systemd1",
                path="/org/freedesktop/systemd1",
                interface="org.freedesktop.DBus.Properties",
                member="Get",
                signature="ss",
                body=["org.freedesktop.systemd1.Manager", "SystemState"],
                # Without this flag dbus-daemon tries to activate systemd1 from a service file.
                flags=MessageFlag.NO_AUTOSTART,
            )
        )
    finally:
        bus.disconnect()
    if reply.message_type == MessageType.ERROR:
        logger.debug("SystemState query failed: %s %s", reply.error_name, reply.body)
        return ""
    return reply.body[0].value


async def _wait_ready(manager: UserManager, process: asyncio.subprocess.Process, timeout: float) -> None:
    socket_path = Path(manager.runtime_dir, "bus")
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise UserManagerError(
                f"the namespace script of user manager {manager.name} exited with status {process.returncode}; "
                f"its log {manager.log_path} ends with:\n{manager.log_tail()}"
            )
        if socket_path.is_socket():
            try:
                async with asyncio.timeout(2.0):
                    state = await _query_system_state(manager.bus_address)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The bus is up but systemd has not taken its name yet.
                logger.debug("user manager %s not ready yet: %s", manager.name, exc)
            if state in ("running", "degraded"):
                manager._read_pid_files()
                return
        await asyncio.sleep(0.05)
    raise UserManagerError(
        f"user manager {manager.name} did not reach state running within {timeout:.0f} s "
        f"(last SystemState {state!r}); its log {manager.log_path} ends with:\n{manager.log_tail()}"
    )


async def start_user_manager(base_dir: str, *, name: str, ready_timeout: float = 20.0) -> UserManager:
    """Start a private ``systemd --user`` under ``base_dir/name`` and wait until it is running.

    Returns once the manager's SystemState is "running" or "degraded". Raises
    `UserManagerError` when not root or when a command is missing. It also
    raises it when the manager is not ready within `ready_timeout` seconds,
    after stopping what it started.
    The result is also an async context manager that stops the manager on exit.
    """
    unshare, systemd = _check_prerequisites()
    directory = Path(base_dir, name).resolve()
    runtime = directory / "runtime"
    home = directory / "home"
    pid_dir = directory / "pids"
    for path in (runtime, home, pid_dir):
        path.mkdir(parents=True, exist_ok=True)
    # The XDG base directory specification requires XDG_RUNTIME_DIR to have mode 0700.
    os.chmod(runtime, 0o700)
    for stale in pid_dir.glob("*.pid"):
        stale.unlink()

    manager_cgroup = f"fleetkit-um-{name}-{os.getpid()}-{int(time.monotonic() * 1000)}"
    script = directory / "start-manager.sh"
    script.write_text(
        _SCRIPT.format(
            runtime=shlex.quote(str(runtime)),
            home=shlex.quote(str(home)),
            log=shlex.quote(str(directory / "manager.log")),
            pids=shlex.quote(str(pid_dir)),
            systemd=shlex.quote(systemd),
            cgroup=manager_cgroup,
            cgroup_roots=" ".join(shlex.quote(root) for root in cgroup_roots()),
        )
    )
    log_file = open(directory / "manager.log", "ab")
    try:
        process = await asyncio.create_subprocess_exec(
            unshare, "--mount", "--propagation", "private", "/bin/sh", str(script),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    finally:
        log_file.close()

    manager = UserManager(name, directory, process)
    manager.cgroups = [os.path.join(root, manager_cgroup) for root in cgroup_roots()]
    try:
        await _wait_ready(manager, process, ready_timeout)
    except BaseException:
        await manager.stop(timeout=5.0)
        raise
    logger.info("started user manager %s: systemd pid %d, bus %s", name, manager.systemd_pid, manager.bus_address)
    return manager
