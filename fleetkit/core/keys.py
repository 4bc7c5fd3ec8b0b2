"""The layout of fleetkit's persistent state in storage.

Keys are relative to ``[storage] prefix``; the backend adds the prefix.

- ``units/<name>``: the unit record (JSON: name, unit_file, hash,
  desired_state), written by the control API.
- ``schedule/<name>``: the machine a non-global unit is placed on (UTF-8
  machine id), written only by the leader, with a fence.
- ``leader``: the leader record (JSON: machine, address, version), attached
  to the leader's lease.
"""

UNITS = "units/"
SCHEDULE = "schedule/"
LEADER = "leader"


def unit_key(name: str) -> str:
    return UNITS + name


def schedule_key(name: str) -> str:
    return SCHEDULE + name


def name_from_key(prefix: str, key: str) -> str:
    """Return the unit name of a key under `prefix` (``units/`` or ``schedule/``)."""
    return key[len(prefix):]
