"""Every config key, CLI command and listing field has an entry in the docs."""

from __future__ import annotations

import argparse
from pathlib import Path

from fleetkit.cli import commands
from fleetkit.cli.main import build_parser

DOCS = Path(__file__).resolve().parent.parent / "docs"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_command_documented():
    text = (DOCS / "cli.md").read_text()
    for name, parser in subcommands(build_parser()).items():
        assert f"`{name}" in text, f"docs/cli.md has no entry for the command {name}"
        for sub_name in subcommands(parser):
            assert f"{name} {sub_name}" in text, f"docs/cli.md has no entry for {name} {sub_name}"


def test_every_option_documented():
    text = (DOCS / "cli.md").read_text()
    for name, parser in subcommands(build_parser()).items():
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and action.help != argparse.SUPPRESS and option != "--help":
                    assert option in text, f"docs/cli.md does not mention {option} of {name}"


def test_every_listing_field_documented():
    text = (DOCS / "cli.md").read_text()
    for fields in (commands.UNIT_FIELDS, commands.UNIT_FILE_FIELDS, commands.MACHINE_FIELDS):
        for field in fields:
            assert field in text, f"docs/cli.md does not mention the field {field}"


def test_glossary_terms_present():
    text = (DOCS / "glossary.md").read_text()
    for term in ("unit", "unit file", "machine", "agent", "engine", "leader", "lease", "desired state",
                 "current state", "schedule", "transport", "storage"):
        assert f"| {term} |" in text, f"docs/glossary.md has no entry for {term}"


def test_every_hook_documented():
    from fleetkit.core import hookspecs

    text = (DOCS / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("fleetkit_")]
    assert hooks
    for name in hooks:
        assert f"`{name}(" in text, f"docs/plugins.md has no entry for the hook {name}"
