"""Copying the persistent cluster state from one store to another.

`migrate_files` reads the ``[storage]`` sections of two config files, opens
both stores and calls `migrate`, which:

1. lists every prefix of `PERSISTENT_PREFIXES` in the source, noting the
   store revision of each listing, and checks each record. Unit records
   must parse with `Unit.from_json`. Keys attached to a lease are never
   copied, and the ``leader`` key lies outside these prefixes;
2. lists the target and rejects a non-empty one unless `force` or `resume`;
3. writes the keys that are missing or different in the target, at most
   `concurrency` writes in flight (with `force`, also deletes target keys
   under these prefixes that the source lacks);
4. lists the source again and fails with `SourceChanged` when a prefix
   changed since step 1, because writes made to the source during the copy
   are not copied;
5. lists the target and compares, per prefix, the key count and a SHA-256
   digest of the sorted key/value pairs with those of the source.

The source is only ever read. A failure after writing started leaves a
partial copy that a run with `resume` completes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleetkit.core import keys, plugins
from fleetkit.core.config import StorageConfig, load_config
from fleetkit.core.errors import ConfigError, FleetkitError, StorageError, UnitError
from fleetkit.core.storage import KeyValue, Storage
from fleetkit.core.units import Unit

# Every prefix that contains persistent state (see fleetkit.core.keys). A new
# persistent prefix added to keys.py must be added here, or it is not migrated.
PERSISTENT_PREFIXES: tuple[str, ...] = keys.PERSISTENT_PREFIXES

WRITE_CONCURRENCY = 64
SHOWN_KEYS = 5

Say = Callable[[str], None]
WriteHook = Callable[[int], Awaitable[None]]


class MigrationError(FleetkitError):
    """The migration failed; `report` records what was read and written until then."""

    def __init__(self, message: str, report: MigrationReport):
        super().__init__(message)
        self.report = report


class SourceChanged(MigrationError):
    """The source changed between reading it and the end of the copy."""


class SameStore(MigrationError):
    """Both config files name the same store and prefix."""


class VerificationFailed(MigrationError):
    """The target does not hold the same keys and values as the source after the copy."""


@dataclass(frozen=True)
class MigrateOptions:
    """Switches of `migrate`; see the module docstring."""

    dry_run: bool = False
    force: bool = False
    resume: bool = False
    skip_invalid: bool = False
    concurrency: int = WRITE_CONCURRENCY


@dataclass
class PrefixReport:
    """Counts and digests of one prefix on both sides."""

    prefix: str
    source_revision: int = 0
    source_keys: int = 0
    source_bytes: int = 0
    source_digest: str = ""
    target_keys: int | None = None
    target_digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "source_revision": self.source_revision, "source_keys": self.source_keys,
            "source_bytes": self.source_bytes, "source_digest": self.source_digest,
            "target_keys": self.target_keys, "target_digest": self.target_digest,
        }


@dataclass
class MigrationReport:
    """Record of what a migration read, wrote and checked; `to_json` gives the ``--output json`` form."""

    source: str = ""
    target: str = ""
    dry_run: bool = False
    prefixes: dict[str, PrefixReport] = field(default_factory=dict)
    to_copy: int = 0
    to_delete: int = 0
    copied: int = 0
    deleted: int = 0
    unchanged: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    invalid: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    writes_started: bool = False
    verified: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(item.source_bytes for item in self.prefixes.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source, "target": self.target, "dry_run": self.dry_run,
            "prefixes": {name: item.to_json() for name, item in self.prefixes.items()},
            "total_bytes": self.total_bytes, "to_copy": self.to_copy, "to_delete": self.to_delete,
            "copied": self.copied, "deleted": self.deleted, "unchanged": self.unchanged,
            "skipped": self.skipped, "invalid": self.invalid, "warnings": self.warnings,
            "verified": self.verified,
        }


def content_digest(items: Iterable[tuple[str, bytes]]) -> str:
    """Return the SHA-256 hex digest of key/value pairs sorted by key.

    Each key (UTF-8) and value is fed as an 8-byte big-endian length and the
    bytes, so that no two different sets of pairs give the same input.
    """
    digest = hashlib.sha256()
    for key, value in sorted(items):
        encoded = key.encode()
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
        digest.update(len(value).to_bytes(8, "big") + value)
    return digest.hexdigest()


def record_problem(prefix: str, item: KeyValue) -> str | None:
    """Return why the record `item` under `prefix` is not valid fleetkit state, or None."""
    name = keys.name_from_key(prefix, item.key)
    if prefix == keys.UNITS:
        try:
            unit = Unit.from_json(item.value)
        except UnitError as error:
            return str(error)
        if unit.name != name:
            return f"the record names the unit {unit.name!r}, not {name!r}"
        return None
    if prefix == keys.SCHEDULE:
        try:
            machine = item.value.decode()
        except UnicodeDecodeError:
            return "the machine id is not UTF-8 text"
        return None if machine else "the machine id is empty"
    return None


def _listing_fingerprint(items: Sequence[KeyValue]) -> list[tuple[str, int]]:
    return [(item.key, item.mod_revision) for item in items]


def _shown(names: Sequence[str]) -> str:
    text = ", ".join(names[:SHOWN_KEYS])
    return text + (f" and {len(names) - SHOWN_KEYS} more" if len(names) > SHOWN_KEYS else "")


def _storage_identity(config: StorageConfig) -> tuple[Any, ...]:
    endpoints = tuple(sorted(url.rstrip("/") for url in config.endpoints))
    path = os.path.realpath(config.path) if getattr(config, "path", "") else ""
    return config.backend, endpoints, path, config.prefix


def _no_say(_line: str) -> None:
    return None


@dataclass
class _Plan:
    """Writes of step 3: keys to put (with values) and keys to delete."""

    puts: list[tuple[str, bytes]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)


async def migrate(source: Storage, target: Storage, options: MigrateOptions = MigrateOptions(), *,
                  say: Say = _no_say, report: MigrationReport | None = None,
                  on_write: WriteHook | None = None) -> MigrationReport:
    """Copy `PERSISTENT_PREFIXES` from the connected `source` to the connected `target`.

    `say` receives one progress line at a time. `report` (a new one by
    default) is filled in as the steps run, so a caller that is interrupted
    can still read how far it got. `on_write(count)` is awaited after each write
    or delete, with the number done so far. Raises `MigrationError` (or a
    subclass) naming what failed and what to do, and `StorageError` when a
    store fails before writing started. Never writes to `source`.
    """
    report = report if report is not None else MigrationReport()
    report.source, report.target, report.dry_run = source.describe(), target.describe(), options.dry_run
    say(f"source: {report.source}")
    say(f"target: {report.target}")
    await _warn_if_leader(source, report, say)

    listings: dict[str, list[KeyValue]] = {}
    selected: dict[str, dict[str, bytes]] = {}
    for prefix in PERSISTENT_PREFIXES:
        items, revision = await source.list(prefix)
        listings[prefix] = items
        selected[prefix] = _select(prefix, items, report)
        chosen = selected[prefix]
        report.prefixes[prefix] = PrefixReport(
            prefix, source_revision=revision, source_keys=len(chosen),
            source_bytes=sum(len(key.encode()) + len(value) for key, value in chosen.items()),
            source_digest=content_digest(chosen.items()),
        )
        say(f"read {prefix} at revision {revision}: {len(items)} keys, {len(chosen)} to migrate "
            f"({report.prefixes[prefix].source_bytes} bytes)")

    existing, _ = await target.list("")
    plan, problems = _plan(existing, selected, options, report)
    if report.invalid and not options.skip_invalid:
        lines = "; ".join(f"{entry['key']}: {entry['problem']}" for entry in report.invalid)
        problems.insert(0, f"the source holds {len(report.invalid)} invalid record(s) ({lines}); fix or delete "
                           "them in the source, or rerun with --skip-invalid to leave them out")
    if problems:
        raise MigrationError("; ".join(problems), report)
    for entry in report.skipped:
        say(f"skipped {entry['key']}: {entry['reason']}")

    report.to_copy, report.to_delete = len(plan.puts), len(plan.deletes)
    verb = "would" if options.dry_run else "will"
    say(f"{verb} copy {report.to_copy} keys ({sum(len(value) for _key, value in plan.puts)} value bytes), "
        f"delete {report.to_delete}, leave {report.unchanged} unchanged; total {report.total_bytes} bytes")
    if options.dry_run:
        say("dry run: nothing was written")
        return report

    await _write(target, plan, options.concurrency, report, on_write)
    say(f"copied {report.copied} keys, deleted {report.deleted}")
    await _check_source_unchanged(source, listings, report)
    await _verify(target, selected, report, say)
    return report


async def _warn_if_leader(source: Storage, report: MigrationReport, say: Say) -> None:
    leader = await source.get(keys.LEADER)
    if leader is None:
        return
    try:
        machine = json.loads(leader.value).get("machine", "?")
    except (ValueError, AttributeError):
        machine = "?"
    warning = (f"the source holds a leader record (machine {machine}), so a daemon may still use it; changes "
               "made during the copy are not copied and make the migration fail, so stop every daemon first")
    report.warnings.append(warning)
    say(f"warning: {warning}")


def _select(prefix: str, items: Sequence[KeyValue], report: MigrationReport) -> dict[str, bytes]:
    """Return the keys of `items` to copy; record leased and invalid ones in `report`."""
    chosen: dict[str, bytes] = {}
    for item in items:
        if item.lease:
            report.skipped.append({"key": item.key, "reason": f"attached to lease {item.lease:x}"})
            continue
        problem = record_problem(prefix, item)
        if problem is not None:
            report.invalid.append({"key": item.key, "problem": problem})
            report.skipped.append({"key": item.key, "reason": f"invalid: {problem}"})
            continue
        chosen[item.key] = item.value
    return chosen


def _plan(existing: Sequence[KeyValue], selected: dict[str, dict[str, bytes]], options: MigrateOptions,
          report: MigrationReport) -> tuple[_Plan, list[str]]:
    """Compare the target with the selection; return the writes and the problems that forbid them."""
    problems: list[str] = []
    if existing and not (options.force or options.resume):
        problems.append(f"the target already holds {len(existing)} key(s) under its prefix "
                        f"({_shown([item.key for item in existing])}); migrate into an empty store, pass "
                        "--resume to continue an interrupted migration, or --force to overwrite these prefixes")
        return _Plan(), problems

    plan = _Plan()
    current = {item.key: item.value for item in existing}
    for prefix, chosen in selected.items():
        for key, value in chosen.items():
            if current.get(key) == value:
                report.unchanged += 1
            else:
                plan.puts.append((key, value))
        plan.deletes.extend(key for key in current if key.startswith(prefix) and key not in chosen)
    if plan.deletes and not options.force:
        problems.append(f"the target holds {len(plan.deletes)} key(s) that the source lacks "
                        f"({_shown(plan.deletes)}); rerun with --force to delete them")
    return plan, problems


async def _write(target: Storage, plan: _Plan, concurrency: int, report: MigrationReport,
                 on_write: WriteHook | None) -> None:
    """Apply `plan` with at most `concurrency` requests in flight; deletes go first."""
    operations: list[Callable[[], Awaitable[Any]]] = []
    for key in plan.deletes:
        operations.append(lambda key=key: _counted(target.delete(key), report, "deleted"))
    for key, value in plan.puts:
        operations.append(lambda key=key, value=value: _counted(target.put(key, value), report, "copied"))
    if not operations:
        return
    pending = iter(operations)
    report.writes_started = True

    async def worker() -> None:
        for operation in pending:
            await operation()
            if on_write is not None:
                await on_write(report.copied + report.deleted)

    total = len(operations)
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(max(concurrency, 1), total)):
                group.create_task(worker())
    except ExceptionGroup as group:
        failures, others = group.split(StorageError)
        if failures is None or others is not None:
            raise
        first = failures.exceptions[0]
        while isinstance(first, ExceptionGroup):
            first = first.exceptions[0]
        raise MigrationError(f"writing to the target failed after {report.copied + report.deleted} of {total} "
                             f"writes: {first}", report) from first


async def _counted(write: Awaitable[Any], report: MigrationReport, counter: str) -> None:
    await write
    setattr(report, counter, getattr(report, counter) + 1)


async def _check_source_unchanged(source: Storage, listings: dict[str, list[KeyValue]],
                                  report: MigrationReport) -> None:
    changed = []
    for prefix, before in listings.items():
        after, revision = await source.list(prefix)
        if _listing_fingerprint(after) != _listing_fingerprint(before):
            changed.append(f"{prefix} (read at revision {report.prefixes[prefix].source_revision}, "
                           f"changed by revision {revision})")
    if changed:
        raise SourceChanged(f"the source changed during the copy: {', '.join(changed)}; the target lacks those "
                            "changes. Stop every fleetkit daemon that uses the source and rerun with --resume",
                            report)


async def _verify(target: Storage, selected: dict[str, dict[str, bytes]], report: MigrationReport,
                  say: Say) -> None:
    mismatched = []
    for prefix, chosen in selected.items():
        items, _ = await target.list(prefix)
        entry = report.prefixes[prefix]
        entry.target_keys = len(items)
        entry.target_digest = content_digest((item.key, item.value) for item in items)
        same = entry.target_keys == len(chosen) and entry.target_digest == entry.source_digest
        say(f"verify {prefix}: source {entry.source_keys} keys sha256 {entry.source_digest}, "
            f"target {entry.target_keys} keys sha256 {entry.target_digest}: {'ok' if same else 'MISMATCH'}")
        if not same:
            mismatched.append(prefix)
    if mismatched:
        raise VerificationFailed(f"the target differs from the source under {', '.join(mismatched)} after the copy; "
                                 "check that nothing else writes to the target, then rerun with --resume", report)
    report.verified = True


# ---------------------------------------------------------------- config files

def side_environment(environ: Mapping[str, str], side: str) -> dict[str, str]:
    """Return the overrides of one side: FLEETKIT_<SIDE>_STORAGE_<KEY> becomes FLEETKIT_STORAGE_<KEY>.

    `side` is "FROM" or "TO". Plain FLEETKIT_* variables are left out, so
    that one variable cannot point both files at one store.
    """
    start = f"FLEETKIT_{side}_STORAGE_"
    return {"FLEETKIT_STORAGE_" + name[len(start):]: value
            for name, value in environ.items() if name.startswith(start)}


def load_storage_config(path: str, option: str, env: Mapping[str, str] | None = None) -> StorageConfig:
    """Load and validate the whole config file `path`; return its ``[storage]`` section.

    `env` contains the FLEETKIT_* overrides to apply (none by default). Problems
    are prefixed with `option` (``--from`` or ``--to``).
    """
    try:
        return load_config(path, env=dict(env or {})).storage
    except ConfigError as error:
        raise ConfigError([f"{option} {path}: {problem}" for problem in error.problems]) from error


def open_storage(config: StorageConfig) -> Storage:
    """Build an unconnected client of the store that `config` describes."""
    storage_class = plugins.load_driver(plugins.STORAGE, config.backend)
    return storage_class.from_config(config)


def same_store(first: StorageConfig, second: StorageConfig) -> bool:
    """Return True when both sections name the same store and prefix."""
    return _storage_identity(first) == _storage_identity(second)


async def migrate_files(source_path: str, target_path: str, options: MigrateOptions = MigrateOptions(), *,
                        say: Say = _no_say, report: MigrationReport | None = None,
                        on_write: WriteHook | None = None,
                        environ: Mapping[str, str] | None = None) -> MigrationReport:
    """Migrate from the ``[storage]`` of `source_path` to that of `target_path`; see `migrate`.

    Overrides come from `environ` (os.environ by default) through
    `side_environment`. Raises `ConfigError` for an invalid file and `MigrationError` when both
    files name the same store and prefix.
    """
    report = report if report is not None else MigrationReport()
    environ = os.environ if environ is None else environ
    source_config = load_storage_config(source_path, "--from", side_environment(environ, "FROM"))
    target_config = load_storage_config(target_path, "--to", side_environment(environ, "TO"))
    if same_store(source_config, target_config):
        raise SameStore(f"--from {source_path} and --to {target_path} name the same store and prefix "
                             f"({source_config.prefix}); point --to at the new store", report)
    source, target = open_storage(source_config), open_storage(target_config)
    try:
        await source.connect()
        await target.connect()
        return await migrate(source, target, options, say=say, report=report, on_write=on_write)
    finally:
        await target.close()
        await source.close()
