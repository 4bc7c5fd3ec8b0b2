"""Plugin hooks: discovery through entry points, validation, and the calls fleetkit makes."""

from __future__ import annotations

import pytest

from fleetkit.core.errors import FleetkitError
from fleetkit.core.hooks import plugin_manager
from fleetkit.core.hookspecs import hookimpl
from fleetkit.core.units import make_unit

SLEEPER = "[Service]\nExecStart=/bin/sleep 3600\n"


class Misspelt:
    @hookimpl
    def fleetkit_validate_units(self, unit):
        return None


def test_contrib_plugin_discovered():
    manager = plugin_manager()

    assert "unit_policy" in dict(manager.list_name_plugin())


def test_misspelt_hook_rejected():
    with pytest.raises(FleetkitError, match="fleetkit_validate_units"):
        plugin_manager(load_entry_points=False, plugins=(Misspelt(),))


def test_policy_plugin_inactive_without_file(monkeypatch):
    monkeypatch.delenv("FLEETKIT_UNIT_POLICY_FILE", raising=False)
    manager = plugin_manager()

    answers = manager.hook.fleetkit_validate_unit(unit=make_unit("a.service", SLEEPER))

    assert all(not answer for answer in answers)


def test_policy_plugin_reports_problems(monkeypatch, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('require_description = true\nforbid_users = ["root"]\nforbid_options = ["Service.Nice"]\n')
    monkeypatch.setenv("FLEETKIT_UNIT_POLICY_FILE", str(policy))
    manager = plugin_manager()
    unit = make_unit("a.service", "[Service]\nUser=root\nNice=5\nExecStart=/bin/true\n")

    problems = [problem for answer in manager.hook.fleetkit_validate_unit(unit=unit) for problem in answer or ()]

    assert any("Description" in problem for problem in problems)
    assert any("User=root" in problem for problem in problems)
    assert any("Nice" in problem for problem in problems)


async def test_policy_rejects_submit_end_to_end(cluster_factory, monkeypatch, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("require_description = true\n")
    monkeypatch.setenv("FLEETKIT_UNIT_POLICY_FILE", str(policy))
    cluster = await cluster_factory({"solo": {}})
    bare = tmp_path / "bare.service"
    bare.write_text(SLEEPER)
    described = tmp_path / "described.service"
    described.write_text("[Unit]\nDescription=ok\n\n" + SLEEPER)

    rejected = await cluster.cli("submit", str(bare), str(described))
    accepted = await cluster.cli("submit", str(described))
    listing = await cluster.cli("list-unit-files", "--no-legend", "--fields", "unit")

    assert rejected.code == 2
    assert "bare.service" in rejected.stderr
    assert "Description" in rejected.stderr
    assert accepted.code == 0, accepted.stderr
    assert listing.stdout.split() == ["described.service"]


class Recorder:
    def __init__(self):
        self.passes = []

    @hookimpl
    def fleetkit_reconcile_finished(self, plan, statistics):
        self.passes.append((plan, statistics))


async def test_engine_calls_reconcile_hook(etcd_server):
    import uuid

    from fleetkit.core.election import Election, LeaderRecord
    from fleetkit.core.engine import Engine
    from fleetkit.plugins.etcd3 import Etcd3Storage

    storage = Etcd3Storage([etcd_server.client_url], prefix=f"/hooks-test/{uuid.uuid4().hex}/")
    await storage.connect()
    recorder = Recorder()
    manager = plugin_manager(load_entry_points=False, plugins=(recorder,))
    election = Election(storage, record=LeaderRecord(machine="m1", address="127.0.0.1:1", version="0"), ttl=5)
    try:
        async with election.leadership() as leadership:
            engine = Engine(storage, leadership, machine_ttl=5, reconcile_interval=1, hooks=manager)
            plan = await engine.reconcile()
    finally:
        await storage.close()

    assert len(recorder.passes) == 1
    assert recorder.passes[0][0] is plan
    assert recorder.passes[0][1]["units"] == 0
