"""Duration strings such as "10s", "500ms" and "1m30s".

The grammar is a sequence of decimal numbers, each followed by a unit:
``ns``, ``us`` (or ``µs``), ``ms``, ``s``, ``m`` or ``h``, as in Go's
``time.ParseDuration``. Unlike Go, a bare number (even "0") and a sign are
rejected: a missing unit is the most common mistake in timeout settings, and
no fleetkit setting takes a negative duration.
"""

from __future__ import annotations

import re

from fleetkit.core.errors import FleetkitError

__all__ = ["DurationError", "format_duration", "parse_duration"]

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

# Longer units come first so that "ms" is not read as "m" followed by "s".
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


class DurationError(FleetkitError, ValueError):
    """An invalid duration string. The message explains the mistake and shows a valid form."""


def parse_duration(text: str) -> float:
    """Parse a duration string into seconds.

    Surrounding whitespace is ignored. Raises `DurationError` for a bare
    number, a sign, an unknown unit or any other text outside the grammar.
    """
    if not isinstance(text, str):
        raise DurationError(f'a duration must be a string with a unit, for example "10s"; got {text!r}')
    stripped = text.strip()
    if not stripped:
        raise DurationError('a duration must not be empty; write for example "10s"')
    if _NUMBER.fullmatch(stripped):
        raise DurationError(f'a duration needs a unit, for example "{stripped.lstrip("+-")}s"')
    if stripped[0] in "+-":
        raise DurationError('a duration cannot have a sign; write for example "10s"')

    total = 0.0
    position = 0
    for match in _PART.finditer(stripped):
        if match.start() != position:
            break
        number, unit = match.groups()
        total += float(number) * _UNIT_SECONDS[unit]
        position = match.end()
    if position != len(stripped) or position == 0:
        raise DurationError(
            'invalid duration; use numbers with the units ns, us, ms, s, m or h, '
            'for example "10s", "500ms" or "1m30s"'
        )
    return total


def format_duration(seconds: float) -> str:
    """Format seconds as the shortest duration string that `parse_duration` reads back.

    Whole hours and minutes are split out ("1m30s"), and a value below one second
    is written in milliseconds ("500ms"). The result is rounded to the
    microsecond, or to the nanosecond below one second.
    """
    if seconds < 0:
        raise DurationError(f"cannot format a negative duration ({seconds} s)")
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{_trim(seconds * 1000)}ms"

    hours, rest = divmod(seconds, 3600.0)
    minutes, rest = divmod(rest, 60.0)
    parts = []
    if hours:
        parts.append(f"{int(hours)}h")
    if minutes:
        parts.append(f"{int(minutes)}m")
    if rest:
        parts.append(f"{_trim(rest)}s")
    return "".join(parts)


def _trim(value: float) -> str:
    # Six decimals keep microseconds and hide float noise such as 0.30000000000000004.
    return f"{value:.6f}".rstrip("0").rstrip(".")
