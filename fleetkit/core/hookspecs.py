"""Hook specifications: the points where plugins contribute to fleetkit.

Plugins are found through the entry-point group ``fleetkit.hooks``; each
entry point names a module or object with functions marked `hookimpl`.
Every implementation is checked against these specifications when the
daemon starts, so a misspelt hook or argument fails loudly.

pluggy calls the implementations of a hook one after another, in the
daemon's event loop thread: they must return quickly and must not block.
Hooks are grouped by lifecycle: daemon, leadership and engine, then units.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("fleetkit")
hookimpl = pluggy.HookimplMarker("fleetkit")


# -- daemon ------------------------------------------------------------------

@hookspec
def fleetkit_daemon_started(config, machine) -> None:
    """Called once the daemon reached its store, before its components start.

    :param config: the validated `fleetkit.core.config.Config`.
    :param machine: this machine's `fleetkit.core.states.MachineInfo`.
    """


@hookspec
def fleetkit_daemon_stopping(config, machine) -> None:
    """Called when the daemon stops; units keep running.

    Exceptions raised here are logged and ignored, so every plugin is called.
    """


# -- leadership and engine ---------------------------------------------------

@hookspec
def fleetkit_leadership_changed(machine, leading: bool) -> None:
    """Called when this machine becomes the leader (`leading` True) or stops leading."""


@hookspec
def fleetkit_reconcile_finished(plan, statistics: dict) -> None:
    """Called by the leader after each reconcile pass was persisted and sent to the agents.

    :param plan: the `fleetkit.core.scheduler.Plan` of the pass (read it, never change it).
    :param statistics: counts from `Engine.statistics()`: units, scheduled,
        machines, connected.
    """


# -- units -------------------------------------------------------------------

@hookspec
def fleetkit_validate_unit(unit) -> list[str] | None:
    """Return the problems that make `unit` unacceptable here, or None.

    Called by the control API for every unit before anything of the request
    is stored; one problem from any plugin rejects the whole request with
    every problem listed. Use it for site policy, for example forbidding
    units that run as root. Each problem is one sentence that names the
    option and the fix.

    :param unit: the parsed `fleetkit.core.units.Unit`.
    """
