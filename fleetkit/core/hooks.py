"""The plugin manager that calls the hooks of `fleetkit.core.hookspecs`."""

from __future__ import annotations

import logging

import pluggy

from fleetkit.core import hookspecs
from fleetkit.core.errors import FleetkitError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fleetkit.hooks"


def plugin_manager(*, load_entry_points: bool = True, plugins: tuple = ()) -> pluggy.PluginManager:
    """Return a manager with the hook specifications, the installed plugins (unless `load_entry_points` is False) and `plugins`.

    Raises `FleetkitError` naming the plugin when one fails to import or
    implements a hook that has no specification.
    """
    manager = pluggy.PluginManager("fleetkit")
    manager.add_hookspecs(hookspecs)
    if load_entry_points:
        try:
            manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as error:  # an installed plugin that fails to import
            raise FleetkitError(f"a plugin in the entry-point group {ENTRY_POINT_GROUP} failed to load: {error}") from error
    for plugin in plugins:
        manager.register(plugin)
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        raise FleetkitError(f"plugin {error.plugin!r} does not match fleetkit's hooks: {error}") from error
    for name, plugin in manager.list_name_plugin():
        log.info("loaded plugin %s (%s)", name, getattr(plugin, "__name__", type(plugin).__name__))
    return manager


def call_safely(hook, **kwargs) -> None:
    """Call a notification hook, logging instead of raising what a plugin raises."""
    try:
        hook(**kwargs)
    except Exception:
        log.exception("a plugin failed in %s", hook.name)
