"""Site policy for fleetkit units, as a fleetkit plugin.

The policy is a TOML file named by the environment variable
``FLEETKIT_UNIT_POLICY_FILE`` of the daemon; without it the plugin accepts
every unit. Keys:

- ``require_description`` (bool): every unit needs ``[Unit] Description``.
- ``forbid_options`` (list of "Section.Key"): options no unit may set, for
  example ``["Service.User"]`` where units must run as the manager's user.
- ``forbid_users`` (list of names): values of ``[Service] User`` that are
  not allowed, for example ``["root"]``.

The file is read once per request, so an edit applies to the next submit.
"""

from __future__ import annotations

import os
import tomllib

from fleetkit.core.hookspecs import hookimpl

POLICY_VARIABLE = "FLEETKIT_UNIT_POLICY_FILE"


def load_policy(path: str) -> dict:
    """Return the policy in `path`; a broken file rejects every unit with the reason."""
    with open(path, "rb") as handle:
        return tomllib.load(handle)


@hookimpl
def fleetkit_validate_unit(unit) -> list[str] | None:
    path = os.environ.get(POLICY_VARIABLE)
    if not path:
        return None
    try:
        policy = load_policy(path)
    except (OSError, tomllib.TOMLDecodeError) as error:
        return [f"the unit policy {path} cannot be read ({error}); fix the file named by {POLICY_VARIABLE}"]

    problems = []
    if policy.get("require_description") and not unit.unit_file.description():
        problems.append("[Unit] Description is required by the site policy; add a Description= line")
    for option in policy.get("forbid_options", []):
        section, _, key = option.partition(".")
        if unit.unit_file.values(section, key):
            problems.append(f"[{section}] {key} is forbidden by the site policy; remove it")
    forbidden_users = set(policy.get("forbid_users", []))
    for user in unit.unit_file.values("Service", "User"):
        if user in forbidden_users:
            problems.append(f"[Service] User={user} is forbidden by the site policy; run the unit as another user")
    return problems
