"""Units: their names, their ``[X-Fleet]`` scheduling options and the stored record.

A unit is a named unit file plus a desired state. `make_unit` is the one way in
from user input: it validates the name, the unit file, the ``[X-Fleet]``
section and the desired state together, so that a `Unit` that exists is one the
scheduler can work with. docs/units.md is the user-facing reference for every
rule here.
"""

from __future__ import annotations

import difflib
import json
import posixpath
import re
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from functools import cached_property

from fleetkit.core.errors import UnitError
from fleetkit.core.unitfile import UnitFile, parse_unit_file

INACTIVE = "inactive"
LOADED = "loaded"
LAUNCHED = "launched"
DESIRED_STATES = (INACTIVE, LOADED, LAUNCHED)

UNIT_TYPES = (
    "automount", "device", "mount", "path", "service",
    "slice", "socket", "swap", "target", "timer",
)  # fmt: skip
TEMPLATE_TYPES = ("path", "service", "socket", "target", "timer")
MAX_NAME_LENGTH = 256
FLEET_SECTION = "X-Fleet"

KNOWN_OPTIONS = ("MachineID", "MachineOf", "MachineMetadata", "Conflicts", "Global", "Replaces")
OPTION_ALIASES = {
    "X-ConditionMachineID": "MachineID",
    "X-ConditionMachineBootID": "MachineID",
    "X-ConditionMachineOf": "MachineOf",
    "X-ConditionMachineMetadata": "MachineMetadata",
    "X-Conflicts": "Conflicts",
}
"""Option names of fleet before v0.8, read as the option they map to."""

_CANONICAL = {**{name: name for name in KNOWN_OPTIONS}, **OPTION_ALIASES}
_NAME_CHARS = re.compile(r"[A-Za-z0-9:_.@\\-]*")
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")
_SPECIFIER = re.compile(r"%(.?)", re.DOTALL)


@dataclass(frozen=True)
class UnitName:
    """A validated unit name split into its parts.

    ``web@3.service``: prefix ``web``, instance ``3``, suffix ``service`` (no
    dot). A template (``web@.service``) has the instance ``""``; a name without
    ``@`` has the instance ``None`` and its prefix is the whole stem.
    """

    name: str
    prefix: str
    instance: str | None
    suffix: str

    @classmethod
    def parse(cls, name: str) -> UnitName:
        """Validate `name` and split it; raises `UnitError` saying what is allowed."""
        _validate_name(name)
        stem = name.rpartition(".")[0]
        prefix, at, instance = stem.partition("@")
        return cls(name, prefix, instance if at else None, name.rpartition(".")[2])

    @property
    def stem(self) -> str:
        """The name without its type suffix (the ``%N`` specifier)."""
        return self.name[: -len(self.suffix) - 1]

    @property
    def is_template(self) -> bool:
        return self.instance == ""

    @property
    def is_instance(self) -> bool:
        return bool(self.instance)

    @property
    def template(self) -> str | None:
        """``prefix@.suffix`` for templates and instances, None for other units."""
        if self.instance is None:
            return None
        return f"{self.prefix}@.{self.suffix}"


def _validate_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise UnitError('unit name is empty; give a name such as "web.service"')
    shown = name if len(name) <= 60 else name[:60] + "..."
    if len(name) > MAX_NAME_LENGTH:
        raise UnitError(
            f'unit name "{shown}" is {len(name)} characters long; '
            f"the limit is {MAX_NAME_LENGTH}"
        )
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        raise UnitError(
            f'unit name "{shown}" has no type suffix; end it with one of '
            f'{", ".join("." + t for t in UNIT_TYPES)} (e.g. "{shown}.service")'
        )
    if suffix not in UNIT_TYPES:
        raise UnitError(
            f'unit name "{shown}" has the unknown type ".{suffix}"; '
            f'use one of {", ".join(UNIT_TYPES)}'
        )
    if name.startswith("@"):
        raise UnitError(
            f'unit name "{shown}" starts with "@"; put a prefix before it, e.g. "web{shown}"'
        )
    if not stem:
        raise UnitError(f'unit name "{shown}" has nothing before ".{suffix}"')
    if "@" in stem and suffix not in TEMPLATE_TYPES:
        raise UnitError(
            f'unit name "{shown}" contains "@", which only '
            f'{", ".join(TEMPLATE_TYPES)} units may have'
        )
    if not _NAME_CHARS.fullmatch(stem):
        bad = next(ch for ch in stem if not _NAME_CHARS.fullmatch(ch))
        raise UnitError(
            f'unit name "{shown}" contains "{bad}"; before the type suffix only letters, '
            'digits and the characters : _ . @ - \\ are allowed'
        )


def mangle_unit_name(arg: str) -> str:
    """Return the unit name that a command-line argument stands for.

    The argument is reduced to its base name; ``.service`` is appended unless it
    already ends in a known unit type (so ``app.target`` stays ``app.target``).
    """
    base = posixpath.basename(arg.rstrip("/"))
    suffix = base.rpartition(".")[2] if "." in base else ""
    return base if suffix in UNIT_TYPES else base + ".service"


@dataclass(frozen=True)
class FleetOptions:
    """The scheduling options of one unit, after specifier substitution.

    `machine_metadata` maps each required key to its allowed values: a machine
    qualifies when it has every key (AND) with one of the allowed values (OR).
    `conflicts` and `replaces` are glob patterns matched against unit names with
    `fnmatch.fnmatchcase`. Treat the mapping as read-only.
    """

    machine_id: str | None = None
    machine_of: tuple[str, ...] = ()
    machine_metadata: dict[str, frozenset[str]] = field(default_factory=dict)
    conflicts: tuple[str, ...] = ()
    is_global: bool = False
    replaces: tuple[str, ...] = ()

    def __hash__(self) -> int:
        metadata = frozenset(self.machine_metadata.items())
        return hash((self.machine_id, self.machine_of, metadata, self.conflicts,
                     self.is_global, self.replaces))  # fmt: skip


def parse_fleet_options(unit_file: UnitFile, name: UnitName) -> FleetOptions:
    """Read the ``[X-Fleet]`` section of `unit_file` for the unit called `name`.

    Every problem found is reported in one `UnitError`, one line each.
    """
    problems: list[str] = []
    raw: dict[str, list[str]] = {option: [] for option in KNOWN_OPTIONS}
    for option in unit_file.options:
        if option.section != FLEET_SECTION:
            continue
        canonical = _CANONICAL.get(option.key)
        if canonical is None:
            problems.append(_unknown_option(option.key))
            continue
        if not option.value:
            problems.append(f"{option.key}= is empty; give a value or remove the line")
            continue
        for token in _split_quoted(option.key, option.value, problems):
            expanded = _expand_specifiers(option.key, token, name, problems)
            if expanded is not None:
                raw[canonical].append(expanded)

    options = FleetOptions(
        machine_id=_machine_id(raw["MachineID"], problems),
        machine_of=_machine_of(raw["MachineOf"], name, problems),
        machine_metadata=_machine_metadata(raw["MachineMetadata"], problems),
        conflicts=_patterns("Conflicts", [p for v in raw["Conflicts"] for p in v.split() or [v]], problems),
        is_global=_global(raw["Global"], problems),
        replaces=_patterns("Replaces", raw["Replaces"], problems),
    )
    problems.extend(_contradictions(options))
    if len(problems) == 1:
        raise UnitError(f"{name.name}: [{FLEET_SECTION}] {problems[0]}")
    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise UnitError(f"{name.name}: {len(problems)} problems in [{FLEET_SECTION}]:\n{listing}")
    return options


def _unknown_option(key: str) -> str:
    known = list(_CANONICAL)
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.6)
    hint = f'did you mean "{_CANONICAL[by_lower[close[0]]]}"? ' if close else ""
    return f'unknown option "{key}"; {hint}known options are {", ".join(KNOWN_OPTIONS)}'


def _split_quoted(key: str, value: str, problems: list[str]) -> list[str]:
    """Split ``"a=1" "b=2"`` into its quoted parts; other values stay whole."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return [value]
    tokens: list[str] = []
    piece: list[str] = []
    quoted = started = False
    for ch in value:
        if ch == '"':
            quoted, started = not quoted, True
        elif ch.isspace() and not quoted:
            if started:
                tokens.append("".join(piece))
                piece, started = [], False
        else:
            piece.append(ch)
            started = True
    if quoted:
        problems.append(f"{key}={value} has an unbalanced quote; close every \" it opens")
        return []
    if started:
        tokens.append("".join(piece))
    return tokens


def _expand_specifiers(key: str, value: str, name: UnitName, problems: list[str]) -> str | None:
    table = {"n": name.name, "N": name.stem, "p": name.prefix, "i": name.instance or "", "%": "%"}
    unknown: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) in table:
            return table[match.group(1)]
        unknown.append(match.group(0))
        return match.group(0)

    expanded = _SPECIFIER.sub(substitute, value)
    if unknown:
        problems.append(
            f'{key}={value} uses the unknown specifier "{unknown[0]}"; [X-Fleet] values '
            "may use %n, %N, %p, %i, and %% for a literal %"
        )
        return None
    return expanded


def _machine_id(values: list[str], problems: list[str]) -> str | None:
    distinct = list(dict.fromkeys(values))
    for value in distinct:
        if not value or any(ch.isspace() for ch in value):
            problems.append(f'MachineID "{value}" is not a machine id; give one id without spaces')
            return None
    if len(distinct) > 1:
        problems.append(
            f"MachineID is given {len(distinct)} different values ({', '.join(distinct)}); "
            "a unit can be pinned to one machine only"
        )
    return distinct[-1] if distinct else None


def _machine_of(values: list[str], name: UnitName, problems: list[str]) -> tuple[str, ...]:
    peers: list[str] = []
    for value in dict.fromkeys(values):
        try:
            peer = UnitName.parse(value)
        except UnitError as exc:
            problems.append(f'MachineOf names "{value}", which is not a valid unit name: {exc}')
            continue
        if value == name.name:
            problems.append(f"MachineOf={value} names the unit itself; name another unit")
        elif peer.is_template and not name.is_template:
            problems.append(
                f"MachineOf={value} names a template, which never runs; "
                f"name an instance such as {peer.prefix}@1.{peer.suffix}"
            )
        else:
            peers.append(value)
    return tuple(peers)


def _machine_metadata(values: list[str], problems: list[str]) -> dict[str, frozenset[str]]:
    required: dict[str, set[str]] = {}
    for value in values:
        key, equals, wanted = (part.strip() for part in value.partition("="))
        if not equals or not key or not wanted:
            problems.append(
                f'MachineMetadata entry "{value}" is malformed; write it as "key=value" with a '
                'non-empty key and value, e.g. MachineMetadata=region=eu'
            )
            continue
        required.setdefault(key, set()).add(wanted)
    return {key: frozenset(allowed) for key, allowed in required.items()}


def _patterns(option: str, values: list[str], problems: list[str]) -> tuple[str, ...]:
    patterns: list[str] = []
    for value in dict.fromkeys(values):
        if not value:
            problems.append(f'{option} has an empty pattern ""; give a unit name or glob')
        elif any(ch.isspace() for ch in value):
            problems.append(
                f'{option}={value} contains whitespace, which no unit name can match; '
                f"write one {option}= line per pattern"
            )
        else:
            patterns.append(value)
    return tuple(patterns)


def _global(values: list[str], problems: list[str]) -> bool:
    result = False
    for value in values:
        if value.lower() in _TRUE:
            result = True
        elif value.lower() in _FALSE:
            result = False
        else:
            problems.append(
                f'Global={value} is not a boolean; use one of {", ".join(_TRUE)} '
                f'or {", ".join(_FALSE)}'
            )
    return result


def _contradictions(options: FleetOptions) -> list[str]:
    given = {
        "MachineID": options.machine_id is not None,
        "MachineOf": bool(options.machine_of),
        "Conflicts": bool(options.conflicts),
        "Global": options.is_global,
        "Replaces": bool(options.replaces),
    }
    why = {
        "MachineID": "MachineID already fixes the machine",
        "Global": "a global unit runs on every machine that matches its MachineMetadata",
        "Conflicts": "Replaces already keeps the two units apart",
    }
    pairs = [
        ("MachineID", "MachineOf"), ("MachineID", "Conflicts"), ("MachineID", "Global"),
        ("MachineID", "Replaces"), ("Global", "MachineOf"), ("Global", "Replaces"),
        ("Conflicts", "Replaces"),
    ]  # fmt: skip
    problems = [
        f"{first} cannot be combined with {second}: {why[first]}; remove one of them"
        for first, second in pairs
        if given[first] and given[second]
    ]
    for peer in options.machine_of:
        for option, patterns in (("Conflicts", options.conflicts), ("Replaces", options.replaces)):
            for pattern in patterns:
                if fnmatchcase(peer, pattern):
                    problems.append(
                        f"MachineOf={peer} is matched by this unit's own {option}={pattern}, so "
                        "it could never be placed; narrow the pattern or drop the MachineOf"
                    )
    return problems


@dataclass(frozen=True)
class Unit:
    """A unit as fleetkit stores it: a name, a unit file and a desired state.

    Build one with `make_unit`, `instance_from_template` or `Unit.from_json`,
    which validate; `options` is derived from `unit_file` and `name`.
    """

    name: str
    unit_file: UnitFile
    hash: str
    desired_state: str
    options: FleetOptions

    @property
    def text(self) -> str:
        """The unit file in normal form."""
        return self.unit_file.serialize()

    @cached_property
    def unit_name(self) -> UnitName:
        return UnitName.parse(self.name)

    @property
    def is_global(self) -> bool:
        return self.options.is_global

    def with_desired_state(self, desired_state: str) -> Unit:
        """Return a copy with another desired state, validated as `make_unit` does."""
        _check_desired_state(self.unit_name, desired_state)
        return replace(self, desired_state=desired_state)

    def to_json(self) -> bytes:
        """Encode the stored record: a JSON object with name, unit_file, hash and desired_state."""
        record = {
            "name": self.name,
            "unit_file": self.text,
            "hash": self.hash,
            "desired_state": self.desired_state,
        }
        return json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Unit:
        """Read a record written by `to_json`; the stored hash must match the text."""
        try:
            record = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise UnitError(f"stored unit record is not valid JSON: {exc}") from exc
        fields = ("name", "unit_file", "hash", "desired_state")
        if not isinstance(record, dict) or not all(isinstance(record.get(f), str) for f in fields):
            raise UnitError(
                f"stored unit record must be a JSON object with the string fields "
                f"{', '.join(fields)}; got {str(record)[:80]}"
            )
        unit = make_unit(record["name"], record["unit_file"], record["desired_state"])
        if unit.hash != record["hash"]:
            raise UnitError(
                f"{unit.name}: stored hash {record['hash']} does not match the stored unit file "
                f"(hash {unit.hash}); the record is corrupt, submit the unit again"
            )
        return unit


def _check_desired_state(name: UnitName, desired_state: str) -> None:
    if desired_state not in DESIRED_STATES:
        raise UnitError(
            f'{name.name}: unknown desired state "{desired_state}"; '
            f"use one of {', '.join(DESIRED_STATES)}"
        )
    if name.is_template and desired_state != INACTIVE:
        raise UnitError(
            f"{name.name} is a template and can only have desired state {INACTIVE}; "
            f"load or start an instance such as {name.prefix}@1.{name.suffix} instead"
        )


def make_unit(name: str, text: str, desired_state: str = INACTIVE) -> Unit:
    """Validate and build a unit from its name, unit-file text and desired state."""
    unit_name = UnitName.parse(name)
    _check_desired_state(unit_name, desired_state)
    try:
        unit_file = parse_unit_file(text)
    except UnitError as exc:
        raise UnitError(f"{name}: {exc}") from exc
    _check_fleet_section_name(name, unit_file)
    options = parse_fleet_options(unit_file, unit_name)
    return Unit(name, unit_file, unit_file.hash(), desired_state, options)


def _check_fleet_section_name(name: str, unit_file: UnitFile) -> None:
    """Reject a section whose name is close to, but not, ``X-Fleet``: its options would be ignored silently."""
    for section in unit_file.sections():
        if section == "X-Fleet" or not section.lower().startswith("x-"):
            continue
        similarity = difflib.SequenceMatcher(None, section.lower(), "x-fleet").ratio()
        if similarity >= 0.8:
            raise UnitError(
                f"{name}: section [{section}] looks like a misspelt [X-Fleet]; fleetkit reads only [X-Fleet] "
                "(systemd ignores X- sections), so fix the section name"
            )


def instance_from_template(template: Unit, instance_name: str, desired_state: str = INACTIVE) -> Unit:
    """Create an instance of `template`, sharing its unit file and hash.

    `instance_name` is either the instance string (``"3"``) or the full unit
    name (``"web@3.service"``); a value containing ``@`` must be the latter.
    Specifiers in ``[X-Fleet]`` are substituted for the instance.
    """
    parent = template.unit_name
    if not parent.is_template:
        raise UnitError(f"{template.name} is not a template; templates are named like web@.service")
    if "@" in instance_name:
        unit_name = UnitName.parse(instance_name)
        if unit_name.template != template.name or not unit_name.is_instance:
            raise UnitError(
                f"{instance_name} is not an instance of {template.name}; "
                f"name it {parent.prefix}@<instance>.{parent.suffix}"
            )
    else:
        unit_name = UnitName.parse(f"{parent.prefix}@{instance_name}.{parent.suffix}")
        if not unit_name.is_instance:
            raise UnitError(f"instance name for {template.name} is empty; give one, e.g. 1")
    _check_desired_state(unit_name, desired_state)
    options = parse_fleet_options(template.unit_file, unit_name)
    return Unit(unit_name.name, template.unit_file, template.hash, desired_state, options)


def conflicts(a: Unit, b: Unit) -> bool:
    """Whether `a` and `b` may not share a machine: either's Conflicts matches the other."""
    if a.name == b.name:
        return False
    return any(fnmatchcase(b.name, p) for p in a.options.conflicts) or any(
        fnmatchcase(a.name, p) for p in b.options.conflicts
    )


def replaces(a: Unit, b: Unit) -> bool:
    """Whether one of `a`'s Replaces patterns matches `b`'s name."""
    return a.name != b.name and any(fnmatchcase(b.name, p) for p in a.options.replaces)
