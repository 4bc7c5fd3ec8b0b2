"""The layout of fleetkit's persistent state in storage.

Keys are relative to ``[storage] prefix``; the backend adds the prefix.

- ``units/<name>``: the unit record (JSON: name, unit_file, hash,
  desired_state), written by the control API.
- ``schedule/<name>``: the machine a non-global unit is placed on (UTF-8
  machine id), written only by the leader, with a fence.
- ``leader``: the leader record (JSON: machine, address, version), attached
  to the leader's lease.
- ``nodes/<machine>``: the node record (JSON: version, transports, engine,
  address), attached to the daemon's own lease of ``[agent] ttl``.
- ``machines/<machine>/...``: with the ``etcd-watch`` transport, the units
  desired on a machine, its presence and its unit states.
- ``format``: the layout version (JSON: ``{"fleetkit_format": 1}``), written
  once by the first daemon; it marks the prefix as fleetkit's.

Keys that start with ``.`` belong to the backend itself (for example lease
bookkeeping) and are not part of this layout.
"""

UNITS = "units/"
SCHEDULE = "schedule/"
LEADER = "leader"
FORMAT = "format"
NODES = "nodes/"
# The etcd-watch transport's per-machine schedule, presence and states.
MACHINES = "machines/"

# Prefixes of the state that must survive everything; a store migration copies these.
PERSISTENT_PREFIXES = (UNITS, SCHEDULE)


def unit_key(name: str) -> str:
    return UNITS + name


def schedule_key(name: str) -> str:
    return SCHEDULE + name


def node_key(machine: str) -> str:
    return NODES + machine


def name_from_key(prefix: str, key: str) -> str:
    """Return the unit name of a key under `prefix` (``units/`` or ``schedule/``)."""
    return key[len(prefix):]
