"""A leader in a separate process, for the paused-leader conformance test.

Run as ``python -m fleetkit.testing.leader_probe BACKEND [--ttl SECONDS] [--deadline SECONDS]``.
The first line on standard input is the ``[storage]`` section as a JSON
object (the fields of `fleetkit.core.config.StorageConfig`). It comes on
standard input rather than the command line, so a password never shows in
the process list. The probe loads the driver named BACKEND through its
entry point, campaigns for the leader key and reports on standard output, one
JSON object per line:

- ``{"event": "leader", "fence_key": ..., "fence_revision": N, "lease": N}`` once elected;
- after it reads the line ``write``: ``{"event": "write", "held": BOOL, "result": R, ...}``
  where R is ``"fenced"`` (FencingError), ``"written"`` (with ``"revision"``)
  or ``"error"`` (with ``"error"``, the exception type and message); the
  write is retried for `WRITE_DEADLINE` seconds while it fails with
  StorageUnavailable;
- ``{"event": "error", "error": ...}`` when anything else fails, with exit status 1.

The fenced write goes to the key `WRITE_KEY`. The probe exits on its own when
standard input closes or `--deadline` seconds pass, so it never outlives a
test that forgot it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from typing import Any

from fleetkit.core.config import StorageConfig
from fleetkit.core.election import Election, LeaderRecord
from fleetkit.core.errors import FencingError
from fleetkit.core.plugins import STORAGE, load_driver
from fleetkit.core.retry import Backoff, retry

WRITE_KEY = "probe/write"
# Seconds the fenced write is retried while the store reports StorageUnavailable.
WRITE_DEADLINE = 10.0
RECORD = LeaderRecord(machine="leader-probe", address="127.0.0.1:1", version="0")


def _report(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _storage_config(text: str) -> StorageConfig:
    """Build a StorageConfig from a JSON object, ignoring fields this fleetkit does not know."""
    data = json.loads(text)
    known = {field.name for field in dataclasses.fields(StorageConfig)}
    values = {name: value for name, value in data.items() if name in known}
    if "endpoints" in values:
        values["endpoints"] = tuple(values["endpoints"])
    return StorageConfig(**values)


async def _open_stdin() -> asyncio.StreamReader:
    # A thread blocked in sys.stdin.readline() would keep the process alive
    # past the deadline, so standard input is read through the event loop.
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _read_line(stdin: asyncio.StreamReader) -> str:
    """Return the next line of standard input without its newline; "" at end of input."""
    return (await stdin.readline()).decode().strip()


async def _lead(backend: str, config: StorageConfig, ttl: float, stdin: asyncio.StreamReader) -> None:
    storage = load_driver(STORAGE, backend).from_config(config)
    await storage.connect()
    try:
        election = Election(storage, record=RECORD, ttl=ttl)
        async with election.leadership() as lead:
            _report("leader", fence_key=lead.fence.key, fence_revision=lead.fence.create_revision, lease=lead.lease)
            command = await _read_line(stdin)
            if command != "write":
                return
            is_held = lead.is_held()
            try:
                # Requests left waiting by the pause may fail with the connection
                # they used; an engine would retry such a write, and so does the probe.
                revision = await retry(lambda: storage.put(WRITE_KEY, b"from the probe", fence=lead.fence),
                                       backoff=Backoff(initial=0.05, cap=0.5), deadline=WRITE_DEADLINE,
                                       describe="fenced write")
            except FencingError:
                _report("write", held=is_held, result="fenced")
            except Exception as error:  # reported to the test, which decides
                _report("write", held=is_held, result="error", error=f"{type(error).__name__}: {error}")
            else:
                _report("write", held=is_held, result="written", revision=revision)
    finally:
        await storage.close()


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleetkit.testing.leader_probe", description=__doc__.split("\n")[0])
    parser.add_argument("backend", help="entry-point name of the storage driver")
    parser.add_argument("--ttl", type=float, default=2.0, help="election lease TTL in seconds")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds after which the probe gives up")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    try:
        async with asyncio.timeout(options.deadline):
            stdin = await _open_stdin()
            config = _storage_config(await _read_line(stdin))
            await _lead(options.backend, config, options.ttl, stdin)
    except Exception as error:  # the test reads this line instead of a traceback
        _report("error", error=f"{type(error).__name__}: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
