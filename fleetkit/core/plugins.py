"""Loading of drivers (storage, transport, runtime) through entry points.

Built-in drivers register through the same entry points as third-party
packages; the entry-point name is the word users write in the config.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from stevedore import driver
from stevedore.exception import NoMatches

from fleetkit.core.errors import FleetkitError

STORAGE = "fleetkit.storage"
TRANSPORT = "fleetkit.transport"
RUNTIME = "fleetkit.runtime"

_SETTINGS = {STORAGE: "storage.backend", TRANSPORT: "transport.mode", RUNTIME: "runtime.backend"}


def available(namespace: str) -> list[str]:
    """Return the names registered in `namespace`, sorted."""
    return sorted({entry.name for entry in entry_points(group=namespace)})


def load_driver(namespace: str, name: str) -> type:
    """Return the class registered as `name` in `namespace`, or raise naming the choices."""
    try:
        manager = driver.DriverManager(namespace=namespace, name=name, invoke_on_load=False)
    except NoMatches:
        choices = ", ".join(available(namespace)) or "none"
        raise FleetkitError(
            f"{_SETTINGS.get(namespace, namespace)} = {name!r} is not installed; available: {choices}"
        ) from None
    except Exception as error:  # an installed plugin that fails to import
        raise FleetkitError(f"plugin {name!r} in {namespace} failed to load: {error}") from error
    return manager.driver
