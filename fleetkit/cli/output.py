"""Tables and JSON for the listing commands, with fleetctl's fields and columns."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from fleetkit.core.errors import FleetkitError

SHORT_ID = 8
SHORT_HASH = 7


class UsageError(FleetkitError):
    """A command-line argument is invalid (exit code 2 unless stated otherwise)."""

    def __init__(self, message: str, *, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def machine_legend(machine: str, ip: str, *, full: bool) -> str:
    """Return ``id/ip`` with the id cut to 8 characters and ``...`` unless `full`."""
    if not machine:
        return "-"
    shown = machine if full or len(machine) <= SHORT_ID else machine[:SHORT_ID] + "..."
    return f"{shown}/{ip}" if ip else shown


def short_hash(value: str, *, full: bool) -> str:
    if not value:
        return "-"
    return value if full else value[:SHORT_HASH]


def metadata_text(metadata: dict[str, str]) -> str:
    if not metadata:
        return "-"
    return ",".join(f"{key}={metadata[key]}" for key in sorted(metadata))


def parse_fields(text: str | None, known: Sequence[str], default: Sequence[str]) -> list[str]:
    """Return the requested fields, or raise naming the unknown one and the valid ones (exit code 1)."""
    if text is None:
        return list(default)
    fields = [field.strip() for field in text.split(",")]
    for field in fields:
        if field not in known:
            raise UsageError(
                f"invalid field {field!r} in --fields; valid fields: {','.join(known)}", exit_code=1,
            )
    return fields


def render_table(rows: list[dict[str, str]], fields: Sequence[str], *, legend: bool) -> str:
    """Return rows as columns separated by at least two spaces, headed by upper-case field names."""
    header = [field.upper() for field in fields]
    cells = [[row.get(field) or "-" for field in fields] for row in rows]
    widths = [len(name) for name in header]
    for line in cells:
        widths = [max(width, len(cell)) for width, cell in zip(widths, line)]
    out = []
    if legend:
        out.append(header)
    out.extend(cells)
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in out)


def render(
    rows: list[dict[str, str]],
    records: list[dict],
    *,
    fields: Sequence[str],
    output: str,
    legend: bool,
    writer: Callable[[str], None] = print,
) -> None:
    """Print `rows` as a table, or `records` as a JSON list."""
    if output == "json":
        writer(json.dumps(records, indent=2, sort_keys=True))
        return
    text = render_table(rows, fields, legend=legend)
    if text:
        writer(text)
