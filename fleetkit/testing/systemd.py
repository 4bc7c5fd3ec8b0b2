"""pytest fixtures that start real ``systemd --user`` managers.

Load them with ``pytest_plugins = ["fleetkit.testing.systemd"]`` in a
conftest.py, or import the fixture names into a test module. Each manager runs
in a private mount namespace (see `fleetkit.usermanager`), which needs root.
Managers live under a short directory in /tmp because the bus socket path must
fit the 108-byte limit of a unix socket address, which pytest's ``tmp_path``
can exceed.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from fleetkit.usermanager import UserManager, start_user_manager

UserManagerFactory = Callable[..., Awaitable[UserManager]]


@pytest.fixture
async def user_manager_factory() -> AsyncIterator[UserManagerFactory]:
    """Yield ``factory(name="machine-N")``, which starts another user manager; all stop at teardown."""
    base_dir = tempfile.mkdtemp(prefix="fk-um-")
    managers: list[UserManager] = []

    async def factory(name: str | None = None) -> UserManager:
        manager = await start_user_manager(base_dir, name=name or f"machine-{len(managers) + 1}")
        managers.append(manager)
        return manager

    try:
        yield factory
    finally:
        for manager in reversed(managers):
            await manager.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
async def user_manager(user_manager_factory: UserManagerFactory) -> UserManager:
    """Return a running user manager, stopped at teardown."""
    return await user_manager_factory("machine")
