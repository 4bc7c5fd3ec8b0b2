"""Specs of configuration keys and sections, and the checks of single keys.

A `KeySpec` describes one key by kind, check, choices, default and doc, and a
`SectionSpec` groups the keys of one TOML table with the dataclass that stores
them. `fleetkit.core.config` builds `SCHEMA` from both. This module also reads
a TOML value or an environment string as its key's kind, validates it, and
formats values for messages and for `Config.redacted`. A failed check raises
`_Invalid`, which `parse_config` turns into lines of one `ConfigError`. The
checks of address keys are in `fleetkit.core.addresses`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from fleetkit.core.durations import format_duration, parse_duration

_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]+")


KINDS = ("string", "boolean", "duration", "list", "table")


@dataclass(frozen=True)
class KeySpec:
    """One configuration key.

    `kind` (one of KINDS) decides how a TOML value and an environment string
    are read; `check` then validates and normalizes the value, raising
    `_Invalid`. `choices` restricts a string to a set of names. `default` and
    `default_factory` are copied from the section's dataclass field.
    """

    name: str
    kind: str
    doc: str
    check: Callable[[Any], Any] | None = None
    choices: Collection[str] | None = None
    secret: bool = False
    default: Any = None
    default_factory: Callable[[], Any] | None = None

    def default_value(self) -> Any:
        """Return the default, calling `default_factory` if there is one."""
        return self.default_factory() if self.default_factory is not None else self.default


@dataclass(frozen=True)
class SectionSpec:
    """One configuration section: its TOML table name, dataclass and keys."""

    name: str
    factory: type
    keys: tuple[KeySpec, ...]

    def key(self, name: str) -> KeySpec | None:
        """Return the spec of key `name`, or None if the section has no such key."""
        return next((spec for spec in self.keys if spec.name == name), None)


class _Invalid(Exception):
    """A value failed a check. `findings` are (subscript, value, message) triples.

    The subscript ("[1]" or ".region") points inside a list or table; the
    value is the offending element, or _WHOLE for the value as a whole.
    `partial` is the value without its bad entries, if it can still be checked.
    """

    def __init__(self, message: str = "", *, findings: list[tuple[str, Any, str]] | None = None,
                 partial: Any = None):
        super().__init__(message)
        self.findings = findings if findings is not None else [("", _WHOLE, message)]
        self.partial = partial


_WHOLE = object()


def _section(name: str, factory: type, *keys: KeySpec) -> SectionSpec:
    fields = {item.name: item for item in dataclasses.fields(factory)}
    filled = []
    for spec in keys:
        if spec.kind not in KINDS:
            raise ValueError(f"key {name}.{spec.name} has unknown kind {spec.kind!r}; use one of {KINDS}")
        source = fields[spec.name]
        factory_fn = None if source.default_factory is dataclasses.MISSING else source.default_factory
        filled.append(dataclasses.replace(spec, default=source.default, default_factory=factory_fn))
    return SectionSpec(name, factory, tuple(filled))


def _fail(message: str) -> None:
    raise _Invalid(message)


def _choose(value: str, choices: Collection[str], label: str) -> str:
    if value in choices:
        return value
    known = ", ".join(sorted(choices))
    close = difflib.get_close_matches(value, sorted(choices), n=1)
    hint = f'; did you mean "{close[0]}"?' if close else ""
    raise _Invalid(f"unknown {label}; choose one of: {known}{hint}")


def _at_least(minimum: float) -> Callable[[float], float]:
    def check(seconds: float) -> float:
        if minimum and seconds < minimum:
            _fail(f'must be at least {format_duration(minimum)}, for example "{format_duration(minimum * 5)}"')
        if seconds <= 0:
            _fail('must be greater than zero, for example "5s"')
        return seconds

    return check


def _check_node_name(value: str) -> str:
    if not _NODE_NAME.fullmatch(value):
        _fail("invalid node name; use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def _check_metadata(table: dict[str, str]) -> dict[str, str]:
    findings = [(f".{_toml_key(key)}", key, "invalid metadata key; use letters, digits, '_', '.' or '-'")
                for key in table if not _METADATA_KEY.fullmatch(key)]
    if findings:
        raise _Invalid(findings=findings)
    return dict(table)


def _check_public_ip(value: str) -> str:
    if not value:
        return value
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise _Invalid('not an IP address; write for example "192.0.2.10", or "" to detect it') from None
    if address.is_unspecified:
        _fail('an unspecified address cannot be reached; write this machine\'s address, or "" to detect it')
    return str(address)


def _check_absolute_path(value: str) -> str:
    if not value.startswith("/"):
        _fail(f'must be an absolute path, for example "/{value.lstrip("./") or "var/lib/fleetkit"}"')
    return value


def _check_optional_path(value: str) -> str:
    return value and _check_absolute_path(value)


def _check_endpoints(endpoints: list[str]) -> tuple[str, ...]:
    # Which URLs are valid depends on storage.backend, so the URLs themselves
    # are checked across keys, in fleetkit.core.config.
    return tuple(endpoints)


def _check_existing_file(value: str) -> str:
    """Check an optional absolute path of a file that must exist. Reads nothing but the file's status."""
    if not value:
        return value
    _check_absolute_path(value)
    try:
        status = os.stat(value)
    except FileNotFoundError:
        _fail('no such file; give the path of an existing PEM file, or "" for none')
    except NotADirectoryError:
        _fail('no such file (a parent is not a directory); give the path of an existing PEM file, or "" for none')
    except OSError:
        return value  # unreadable for this user, such as root-only key files: the daemon may still read it
    if stat.S_ISDIR(status.st_mode):
        _fail('is a directory; give the path of a PEM file, or "" for none')
    return value


def _check_prefix(value: str) -> str:
    if not (value.startswith("/") and value.endswith("/")):
        _fail(f'must start and end with "/", for example "/{value.strip("/") or "fleetkit"}/"')
    return value


def _check_bus(value: str) -> str:
    if value in ("system", "user"):
        return value
    for address in filter(None, value.split(";")):
        transport, colon, rest = address.partition(":")
        pairs = [item.partition("=") for item in rest.split(",")] if rest else []
        keys = {key for key, equals, text in pairs if key and equals}
        if transport not in ("unix", "tcp") or not colon or len(keys) != len(pairs):
            _fail('expected "system", "user" or a D-Bus address such as "unix:path=/run/user/1000/bus"')
        needed = {"unix": {"path", "abstract"}, "tcp": {"host"}}[transport]
        if not keys & needed:
            _fail(f'a {transport}: D-Bus address needs one of {", ".join(sorted(needed))}=..., '
                  'for example "unix:path=/run/user/1000/bus"')
    return value


_TYPE_NAMES = {bool: "a boolean", str: "a string", int: "an integer", float: "a float", list: "an array",
               dict: "a table"}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def _from_toml(spec: KeySpec, value: Any) -> Any:
    if spec.kind == "duration":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise _Invalid(f'a duration needs a unit, for example "{value}s"')
    expected = {"string": str, "duration": str, "boolean": bool, "list": list, "table": dict}[spec.kind]
    if not isinstance(value, expected):
        raise _Invalid(f"expected {_TYPE_NAMES[expected]}, got {_type_name(value)}")
    if spec.kind == "duration":
        return parse_duration(value)
    if spec.kind in ("list", "table"):
        findings = []
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if not isinstance(item, str):
                subscript = f"[{key}]" if isinstance(key, int) else f".{_toml_key(key)}"
                findings.append((subscript, item, f"expected a string, got {_type_name(item)}"))
        if findings and isinstance(value, dict):
            # Checking the string entries too lets one pass report every bad entry.
            partial = {key: item for key, item in value.items() if isinstance(item, str)}
            raise _Invalid(findings=findings, partial=partial)
        if findings:
            raise _Invalid(findings=findings)
    return value


def _validate_key(spec: KeySpec, raw: Any, read: Callable[[KeySpec, Any], Any],
                  allowed: Collection[str] | None) -> Any:
    """Read `raw` with `read`, then apply `allowed` and `spec.check`, raising _Invalid with all findings."""
    findings = []
    try:
        value = read(spec, raw)
    except _Invalid as error:
        if error.partial is None:
            raise
        findings, value = error.findings, error.partial
    if allowed is not None:
        value = _choose(value, allowed, spec.name.replace("_", " "))
    if spec.check is not None:
        try:
            value = spec.check(value)
        except _Invalid as error:
            findings += error.findings
    if findings:
        raise _Invalid(findings=findings)
    return value


def _as_default(spec: KeySpec, value: Any) -> Any:
    return value


def _from_env(spec: KeySpec, text: str) -> Any:
    if spec.kind == "boolean":
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0"):
            raise _Invalid('expected true or false, for example "false"')
        return lowered in ("true", "1")
    if spec.kind == "duration":
        return parse_duration(text)
    if spec.kind == "list":
        return [item.strip() for item in text.split(",") if item.strip()]
    if spec.kind == "table":
        table = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, equals, value = item.partition("=")
            if not equals or not key.strip():
                raise _Invalid('expected KEY=VALUE items separated by commas, for example "region=eu,disk=ssd"')
            table[key.strip()] = value.strip()
        return table
    return text


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _mask_url(text: str) -> str:
    """Replace the password in a URL's user info with "***".

    The user info is everything between "://" and the last "@", so a password
    with an unescaped "/" or "@" is masked whole too, and a text that is not a
    valid URL is masked all the same.
    """
    scheme, separator, rest = text.partition("://")
    if not separator or "@" not in rest:
        return text
    userinfo, _, hostpath = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}:***@{hostpath}" if colon else text


def _show(value: Any) -> str:
    """Format a value as TOML writes it, with URL passwords masked, for use in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(_mask_url(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(str(key))} = {_show(item)}" for key, item in value.items()) + " }"
    return str(value)


def _display(spec: KeySpec, value: Any) -> Any:
    if spec.secret:
        return "***" if value else ""
    if spec.kind == "duration":
        return format_duration(value)
    if spec.kind == "list":
        return [_mask_url(item) for item in value]
    if spec.kind == "table":
        return dict(value)
    return _mask_url(value) if isinstance(value, str) else value
