"""Parse systemd unit files and write them back in fleetkit's normal form.

A unit file is kept as an ordered list of options, each a (section, key, value)
triple. Nothing is merged on parsing: repeated keys stay repeated, in order,
because systemd gives meaning to repetition (several ``ExecStartPre=`` lines,
several ``MachineMetadata=`` lines).

The normal form is what fleetkit stores, hashes, shows in ``cat`` and writes
for the agent: sections in order of first appearance (a section that appears
twice is merged into its first occurrence), one ``Key=Value`` line per option,
one blank line between sections and a newline at the end. Comments, blank lines
and the whitespace around keys, ``=`` and values are not part of it, so they do
not change the hash; the order of options does. For files without continuation
lines the normal form and its SHA-1 are the same as CoreOS fleet's.

Parsing rules that differ from systemd or fleet, on purpose:

- A value line ending in a backslash continues on the next line. The stored
  value joins the pieces with one space and drops the backslash and the
  whitespace around the join. A blank line or the end of the file ends the
  value; comment lines inside a continued value are skipped, as systemd does.
  (fleet kept the backslash and the newline in the value.)
- Lines that fleet skipped silently are errors here: an option before the first
  section header, an empty key, a file without any section header.
- Whitespace inside the brackets of a section header is ignored: ``[ Unit ]``
  is the section ``Unit``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from fleetkit.core.errors import UnitError

MAX_LINE_BYTES = 2048
"""Longest accepted physical line, in UTF-8 bytes (the limit fleet's API enforced)."""

_COMMENT_STARTS = ("#", ";")
_SHOWN_CHARS = 60


class Option(NamedTuple):
    """One ``Key=Value`` line of a unit file, with the section it belongs to."""

    section: str
    key: str
    value: str


@dataclass(frozen=True)
class UnitFile:
    """A parsed unit file: an immutable, ordered list of options.

    `section_names` keeps sections that have a header but no options, so that
    they survive serialization; sections named by `options` are added to it in
    order of first appearance when they are missing.
    """

    options: tuple[Option, ...]
    section_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        options = tuple(Option(*option) for option in self.options)
        names = dict.fromkeys(self.section_names)
        for option in options:
            names.setdefault(option.section)
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "section_names", tuple(names))

    def sections(self) -> list[str]:
        """Section names in order of first appearance."""
        return list(self.section_names)

    def values(self, section: str, key: str) -> list[str]:
        """Every value of `key` in `section`, in file order (case-sensitive names)."""
        return [o.value for o in self.options if o.section == section and o.key == key]

    def value(self, section: str, key: str, default: str | None = None) -> str | None:
        """The last value of `key` in `section`, as systemd reads single-valued keys."""
        values = self.values(section, key)
        return values[-1] if values else default

    def description(self) -> str:
        """The first ``[Unit] Description=`` value, or ``""``."""
        values = self.values("Unit", "Description")
        return values[0] if values else ""

    def serialize(self) -> str:
        """The normal form: what fleetkit stores, hashes and hands to systemd."""
        return self._normal_form

    def hash(self) -> str:
        """SHA-1 of the normal form, 40 lowercase hex characters."""
        return self._hash

    @cached_property
    def _normal_form(self) -> str:
        lines: dict[str, list[str]] = {name: [] for name in self.section_names}
        for option in self.options:
            lines[option.section].append(f"{option.key}={option.value}\n")
        return "\n".join(f"[{name}]\n" + "".join(body) for name, body in lines.items())

    @cached_property
    def _hash(self) -> str:
        return hashlib.sha1(self._normal_form.encode("utf-8")).hexdigest()


def parse_unit_file(text: str) -> UnitFile:
    """Parse the text of a unit file.

    Accepts LF and CRLF line endings and a leading byte-order mark. Raises
    `UnitError` naming the 1-based line number and the offending line when the
    text is not a unit file; see the module docstring for the rules.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise UnitError('unit file is empty; it needs at least one section, e.g. "[Service]"')

    options: list[Option] = []
    sections: dict[str, None] = {}
    section: str | None = None
    continued: tuple[str, list[str]] | None = None  # (key, value pieces) while a value continues

    for number, line in enumerate(text.split("\n"), start=1):
        if line.endswith("\r"):
            line = line[:-1]
        _check_length(number, line)
        stripped = line.strip()

        if continued is not None:
            if not stripped:
                options.append(_joined(section, continued))
                continued = None
            elif not stripped.startswith(_COMMENT_STARTS):
                piece, more = _split_backslash(stripped)
                continued[1].append(piece)
                if not more:
                    options.append(_joined(section, continued))
                    continued = None
            continue

        if not stripped or stripped.startswith(_COMMENT_STARTS):
            continue

        if stripped.startswith("["):
            section = _section_name(number, stripped)
            sections.setdefault(section)
            continue

        key, value = _key_value(number, stripped, section)
        value, more = _split_backslash(value)
        if more:
            continued = (key, [value])
        else:
            options.append(Option(section, key, value))  # type: ignore[arg-type]

    if continued is not None:
        options.append(_joined(section, continued))
    if not sections:
        raise UnitError(
            'unit file has no section header; add one such as "[Service]" above the options'
        )
    return UnitFile(tuple(options), tuple(sections))


def _check_length(number: int, line: str) -> None:
    try:
        size = len(line.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise UnitError(
            f"line {number}: text is not valid Unicode, got {_show(line)}; "
            "save the file as UTF-8"
        ) from exc
    if size > MAX_LINE_BYTES:
        raise UnitError(
            f"line {number}: line is {size} bytes long, over the limit of {MAX_LINE_BYTES}, "
            f"got {_show(line)}; split the value over several lines ending in a backslash"
        )


def _section_name(number: int, stripped: str) -> str:
    end = stripped.find("]")
    if end < 0:
        raise UnitError(
            f'line {number}: section header has no closing "]", got {_show(stripped)}; '
            f'write it as "[Name]"'
        )
    if stripped[end + 1 :]:
        raise UnitError(
            f'line {number}: unexpected text after "]" in a section header, got '
            f"{_show(stripped)}; put each option on its own line below the header"
        )
    name = stripped[1:end].strip()
    if not name:
        raise UnitError(
            f'line {number}: section header has no name, got {_show(stripped)}; '
            f'name the section, e.g. "[Service]"'
        )
    return name


def _key_value(number: int, stripped: str, section: str | None) -> tuple[str, str]:
    if "=" not in stripped:
        raise UnitError(
            f'line {number}: expected "Key=Value" or "[Section]", got {_show(stripped)}; '
            'add the "=" between the key and its value'
        )
    if section is None:
        raise UnitError(
            f"line {number}: option comes before any section header, got {_show(stripped)}; "
            'add a header such as "[Service]" above it'
        )
    key, _, value = stripped.partition("=")
    key = key.strip()
    if not key:
        raise UnitError(
            f'line {number}: option has no key before "=", got {_show(stripped)}; '
            'write it as "Key=Value"'
        )
    return key, value.strip()


def _split_backslash(value: str) -> tuple[str, bool]:
    """Return the value without a trailing backslash and whether one was there."""
    if value.endswith("\\"):
        return value[:-1].rstrip(), True
    return value, False


def _joined(section: str | None, continued: tuple[str, list[str]]) -> Option:
    key, pieces = continued
    return Option(section, key, " ".join(piece for piece in pieces if piece))  # type: ignore[arg-type]


def _show(line: str) -> str:
    if len(line) > _SHOWN_CHARS:
        line = line[:_SHOWN_CHARS] + "..."
    return f'"{line}"'
