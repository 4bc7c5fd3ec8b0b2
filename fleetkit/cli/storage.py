"""``fleetkit storage``: tools that work on the cluster store directly, without a daemon.

``storage migrate --from A.toml --to B.toml`` copies the persistent state
from the ``[storage]`` of A.toml to that of B.toml (see
`fleetkit.core.migrate`). It prints one line per step, or a JSON report
with the global ``--output json``. Exit codes: 0 success, 1 failure,
2 usage error, 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys

from fleetkit.core.errors import FleetkitError

# fleetkit.core.migrate is imported by run() only, to keep the start of every other command fast.
WRITE_CONCURRENCY = 64  # the default of fleetkit.core.migrate.MigrateOptions
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_parser(sub) -> None:
    storage = sub.add_parser("storage", help="work on the cluster store directly (no daemon needed)")
    commands = storage.add_subparsers(dest="storage_command", metavar="SUBCOMMAND", required=True)
    migrate = commands.add_parser(
        "migrate", help="copy the cluster state from the store of one config file to that of another",
        description="Copy every unit record and the schedule from the [storage] of --from to the [storage] "
        "of --to. Stop the fleetkit daemons first; their units keep running.",
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="FILE",
                         help="config file whose [storage] is the store to copy from (only read)")
    migrate.add_argument("--to", dest="target", required=True, metavar="FILE",
                         help="config file whose [storage] is the store to copy to")
    migrate.add_argument("--dry-run", action="store_true",
                         help="read both stores, run every check and print what would be copied; write nothing")
    migrate.add_argument("--force", action="store_true",
                         help="accept a non-empty target: overwrite its keys and delete those the source lacks")
    migrate.add_argument("--resume", action="store_true",
                         help="continue an interrupted migration: copy only keys missing or different in the target")
    migrate.add_argument("--skip-invalid", action="store_true",
                         help="leave out source records that do not parse instead of failing")
    migrate.add_argument("--concurrency", type=int, default=WRITE_CONCURRENCY, metavar="N",
                         help=f"writes in flight at once, 1 to 1024 (default: {WRITE_CONCURRENCY})")
    # The global --output is accepted after the command too.
    migrate.add_argument("-o", "--output", choices=("table", "json"), default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)


def run(args) -> int:
    from fleetkit.core.migrate import (
        MigrateOptions, MigrationReport, SameStore, SourceChanged, VerificationFailed, migrate_files,
    )

    if not 1 <= args.concurrency <= 1024:
        print(f"error: --concurrency {args.concurrency} is out of range; use 1 to 1024", file=sys.stderr)
        return EXIT_USAGE
    as_json = getattr(args, "output", "table") == "json"
    options = MigrateOptions(dry_run=args.dry_run, force=args.force, resume=args.resume,
                             skip_invalid=args.skip_invalid, concurrency=args.concurrency)
    ignored = sorted(name for name in os.environ if name.startswith("FLEETKIT_STORAGE_"))
    if ignored:
        print(f"warning: {', '.join(ignored)} ignored by storage migrate; set FLEETKIT_FROM_STORAGE_<KEY> or "
              "FLEETKIT_TO_STORAGE_<KEY> to override a key of one side", file=sys.stderr)

    report = MigrationReport()
    say = _print_warning if as_json else _print_line
    try:
        asyncio.run(migrate_files(args.source, args.target, options, say=say, report=report))
    except SameStore as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _fail(args, report, "interrupted by Ctrl-C", resumable=report.writes_started, as_json=as_json)
        return EXIT_INTERRUPTED
    except FleetkitError as error:
        resumable = report.writes_started or isinstance(error, (SourceChanged, VerificationFailed))
        _fail(args, report, str(error), resumable=resumable, as_json=as_json)
        return EXIT_FAILURE

    if as_json:
        print(json.dumps({"ok": True, **report.to_json()}, indent=2, sort_keys=True))
    elif args.dry_run:
        print("dry run complete; rerun without --dry-run to copy")
    else:
        print(f"migration complete: {report.copied} keys copied, {report.deleted} deleted, "
              f"{report.unchanged} already present, {len(report.skipped)} skipped; "
              f"start the daemons with {args.target}")
    return EXIT_OK


def resume_command(args) -> str:
    """Return the command line that continues the migration that `args` started."""
    words = ["fleetkit", "storage", "migrate", "--from", args.source, "--to", args.target]
    if args.force:
        words.append("--force")
    if args.skip_invalid:
        words.append("--skip-invalid")
    if args.concurrency != WRITE_CONCURRENCY:
        words += ["--concurrency", str(args.concurrency)]
    return shlex.join([*words, "--resume"])


def _fail(args, report, message: str, *, resumable: bool, as_json: bool) -> None:
    print(f"error: {message}", file=sys.stderr)
    if resumable:
        print(f"the source was only read and is unchanged, but the target may hold a partial copy. To continue, run:\n"
              f"    {resume_command(args)}", file=sys.stderr)
    if as_json:
        body = {"ok": False, "error": message, **report.to_json()}
        if resumable:
            body["resume_command"] = resume_command(args)
        print(json.dumps(body, indent=2, sort_keys=True))


def _print_line(line: str) -> None:
    print(line, file=sys.stderr if line.startswith("warning: ") else sys.stdout, flush=True)


def _print_warning(line: str) -> None:
    if line.startswith("warning: "):
        print(line, file=sys.stderr, flush=True)
