"""The ``fleetkit`` command line: the daemon, config checks, unit verbs and listings.

Exit codes: 0 success, 1 failure, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import re
import sys

from fleetkit import __version__
from fleetkit.cli import commands
from fleetkit.cli.client import DEFAULT_ENDPOINT, ControlClient
from fleetkit.cli.output import UsageError
from fleetkit.core.credentials import TlsFiles
from fleetkit.core.errors import ApiError, ConfigError, FleetkitError, UnitError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _add_blocking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-block", action="store_true", help="return at once instead of waiting for the state")
    parser.add_argument(
        "--block-timeout", type=float, default=120.0, metavar="SECONDS",
        help="seconds to wait for every unit to reach the state; 0 waits without limit (default: 120)",
    )


def _add_listing(parser: argparse.ArgumentParser, fields: tuple[str, ...], default: tuple[str, ...]) -> None:
    parser.add_argument(
        "--fields", metavar="LIST",
        help=f"comma-separated columns to print; valid: {','.join(fields)} (default: {','.join(default)})",
    )
    parser.add_argument("--no-legend", action="store_true", help="do not print the header line")
    parser.add_argument("-l", "--full", action="store_true", help="print whole machine ids and hashes")


class _SubParsers:
    """Adds the shared `common` options to every subcommand parser."""

    def __init__(self, action, common: argparse.ArgumentParser):
        self._action = action
        self._common = common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._action.add_parser(name, parents=[self._common], **kwargs)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose invalid-choice errors suggest the closest choice."""

    def error(self, message: str):
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if found:
            choices = re.findall(r"'([^']*)'", found.group(2))
            close = difflib.get_close_matches(found.group(1), choices, n=1)
            if close:
                message = f"{message}; did you mean {close[0]!r}?"
        super().error(message)


_TLS_OPTIONS = (
    ("--ca-file", "FLEETKIT_CA_FILE", "PEM file of the cluster CA"),
    ("--cert-file", "FLEETKIT_CERT_FILE", "PEM client certificate (role admin or read-only)"),
    ("--key-file", "FLEETKIT_KEY_FILE", "PEM key of --cert-file"),
)


def client_tls(args) -> TlsFiles | None:
    """Return the TLS files given by --ca-file, --cert-file and --key-file, or None if none is given."""
    given = {"--ca-file": args.ca_file, "--cert-file": args.cert_file, "--key-file": args.key_file}
    if not any(given.values()):
        return None
    if args.insecure:
        raise UsageError("--insecure and the TLS files (--ca-file, --cert-file, --key-file or their FLEETKIT_* "
                         "variables) contradict each other; give the TLS files for a TLS listener, or only "
                         "--insecure for a plaintext one")
    missing = [option for option, value in given.items() if not value]
    if missing:
        raise UsageError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: a TLS "
                         "endpoint needs the cluster CA, a client certificate and its key")
    return TlsFiles(args.ca_file, args.cert_file, args.key_file)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fleetkit", description="Schedule systemd units across a cluster.")
    parser.add_argument("--version", action="version", version=f"fleetkit {__version__}")
    parser.add_argument(
        "--endpoint", default=os.environ.get("FLEETKIT_ENDPOINT", DEFAULT_ENDPOINT),
        help="control API of a daemon: unix:///path/fleetkit.sock or host:port "
        f"(default: $FLEETKIT_ENDPOINT or {DEFAULT_ENDPOINT})",
    )
    parser.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="listing format (default: table)",
    )
    for option, variable, what in _TLS_OPTIONS:
        parser.add_argument(option, default=os.environ.get(variable, ""),
                            help=f"{what} for a TCP endpoint with TLS (default: ${variable})")
    parser.add_argument(
        "--insecure", action="store_true", default=os.environ.get("FLEETKIT_INSECURE", "") in ("1", "true"),
        help="use plaintext to a TCP endpoint whose daemon sets api.insecure = true (default: $FLEETKIT_INSECURE)",
    )
    # The global options are accepted after the command too, as in fleetctl.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint", default=argparse.SUPPRESS, help="control API of a daemon (also accepted before the command)",
    )
    common.add_argument(
        "-o", "--output", choices=("table", "json"), default=argparse.SUPPRESS,
        help="listing format, table or json (also accepted before the command)",
    )
    for option, _variable, what in _TLS_OPTIONS:
        common.add_argument(option, default=argparse.SUPPRESS, help=f"{what} (also accepted before the command)")
    common.add_argument("--insecure", action="store_true", default=argparse.SUPPRESS,
                        help="plaintext to a TCP endpoint (also accepted before the command)")
    sub = _SubParsers(parser.add_subparsers(dest="command", metavar="COMMAND"), common)

    daemon = sub.add_parser("daemon", help="run the fleetkit daemon on this machine")
    daemon.add_argument("--config", help="path to cluster.toml (default: built-in defaults)")
    daemon.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="overrides [log] level")
    daemon.add_argument("--log-format", choices=("text", "json"), help="overrides [log] format")

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    check = config_sub.add_parser("check", help="validate a config file without starting anything")
    check.add_argument("--config", required=True, help="path to cluster.toml")

    for verb, text in (("submit", "store units without scheduling them"),
                       ("load", "store units and load them on their machines"),
                       ("start", "store units, load them and start them")):
        command = sub.add_parser(verb, help=text)
        command.add_argument("units", nargs="+", metavar="UNIT", help="unit file path or unit name")
        command.add_argument("--replace", action="store_true", help="replace stored units whose file changed")
        if verb != "submit":
            _add_blocking(command)

    for verb, text in (("stop", "stop units, keeping them loaded"), ("unload", "stop units and unload them")):
        command = sub.add_parser(verb, help=text)
        command.add_argument("units", nargs="+", metavar="UNIT")
        _add_blocking(command)

    destroy = sub.add_parser("destroy", help="stop, unload and remove units from the cluster")
    destroy.add_argument("units", nargs="+", metavar="UNIT")

    cat = sub.add_parser("cat", help="print a stored unit file")
    cat.add_argument("unit", metavar="UNIT")

    status = sub.add_parser("status", help="show where units run and their states")
    status.add_argument("units", nargs="+", metavar="UNIT")

    _add_listing(sub.add_parser("list-units", help="list unit states per machine"),
                 commands.UNIT_FIELDS, commands.UNIT_DEFAULT)
    _add_listing(sub.add_parser("list-unit-files", help="list stored units"),
                 commands.UNIT_FILE_FIELDS, commands.UNIT_FILE_DEFAULT)
    _add_listing(sub.add_parser("list-machines", help="list machines"),
                 commands.MACHINE_FIELDS, commands.MACHINE_DEFAULT)

    cluster = sub.add_parser("cluster", help="cluster-wide views")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND", required=True)
    cluster_status = cluster_sub.add_parser(
        "status", parents=[common],
        help="each node's version, transports and contact, and the transport migration verdict",
    )
    cluster_status.add_argument(
        "--check", action="store_true", help="exit with code 1 when the cluster is not ready for its next stage",
    )

    from fleetkit.cli import devcluster, storage, tls

    devcluster.add_parser(sub)
    storage.add_parser(sub)
    tls.add_parser(sub)
    return parser


async def _run_client_command(args) -> int:
    async with ControlClient(args.endpoint, tls=client_tls(args), insecure=args.insecure) as client:
        if args.command in commands.CREATING_VERBS:
            return await commands.create(client, args.command, args)
        if args.command in ("stop", "unload"):
            return await commands.set_state(client, args.command, args)
        handler = {
            "destroy": commands.destroy,
            "cat": commands.cat,
            "status": commands.status,
            "list-units": commands.list_units,
            "list-unit-files": commands.list_unit_files,
            "list-machines": commands.list_machines,
            "cluster": commands.cluster_status,
        }[args.command]
        return await handler(client, args)


def _run_daemon(args) -> int:
    import logging

    from fleetkit.core import logs
    from fleetkit.core.config import check_config
    from fleetkit.core.daemon import Daemon, run_until_signalled

    config, warnings = check_config(args.config)
    logs.configure(args.log_level or config.log.level, args.log_format or config.log.format)
    for warning in warnings:
        logging.getLogger("fleetkit.core.config").warning("%s", warning)
    daemon = Daemon(config)
    asyncio.run(run_until_signalled(daemon))
    return EXIT_OK


def _run_config_check(args) -> int:
    from fleetkit.core.config import check_config

    config, warnings = check_config(args.config)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.config}: configuration is valid")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\nerror: no command given; for example: fleetkit list-units", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "daemon":
            return _run_daemon(args)
        if args.command == "config":
            if args.config_command != "check":
                parser.parse_args(["config", "--help"])
            return _run_config_check(args)
        if args.command == "dev-cluster":
            from fleetkit.cli import devcluster

            return devcluster.run(args)
        if args.command == "storage":
            from fleetkit.cli import storage

            return storage.run(args)
        if args.command == "tls":
            from fleetkit.cli import tls

            return tls.run(args)
        return asyncio.run(_run_client_command(args))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except UnitError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE if error.code == "INVALID_ARGUMENT" else EXIT_FAILURE
    except FleetkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
