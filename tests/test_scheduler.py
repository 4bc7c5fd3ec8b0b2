import dataclasses
import random
import re
from collections import Counter
from fnmatch import fnmatchcase, translate

import pytest

from fleetkit.core.scheduler import Decision, Machine, Plan, global_targets, plan, summarize
from fleetkit.core.units import INACTIVE, LAUNCHED, LOADED, instance_from_template, make_unit


def unit(name, *lines, state=LAUNCHED):
    text = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\n" + "".join(line + "\n" for line in lines)
    return make_unit(name, text, state)


def by_name(*units):
    return {u.name: u for u in units}


def machines(*ids, **metadata):
    """Machines by id; keyword arguments give a machine's metadata as "k=v,k=v"."""
    found = {}
    for machine_id in ids:
        spec = metadata.get(machine_id, "")
        pairs = dict(item.split("=") for item in spec.split(",") if item)
        found[machine_id] = Machine(machine_id, ip=f"10.0.0.{len(found) + 1}", metadata=pairs)
    return found


def _matching(pattern, names):
    match = re.compile(translate(pattern)).match
    return {name for name in names if match(name)}


def assert_valid(result: Plan, units, present):
    """Every constraint holds in `result`, and planning again changes nothing."""
    on = {m: set() for m in present}
    for name, machine_id in result.schedule.items():
        assert machine_id in present
        on[machine_id].add(name)
    for name, machine_ids in result.global_machines.items():
        assert name not in result.schedule
        for machine_id in machine_ids:
            on[machine_id].add(name)
    for machine_id, names in on.items():
        for name in names:
            options = units[name].options
            for key, allowed in options.machine_metadata.items():
                assert present[machine_id].metadata.get(key) in allowed, (name, machine_id)
            if options.machine_id:
                assert machine_id.startswith(options.machine_id)
            for peer in options.machine_of:
                assert peer in names, (name, peer, machine_id)
            for pattern in options.conflicts:
                assert _matching(pattern, names) <= {name}, (name, pattern, machine_id)
            for pattern in options.replaces:
                for other in _matching(pattern, names) - {name}:
                    assert any(fnmatchcase(name, p) for p in units[other].options.replaces)
    again = plan(units, present, result.schedule)
    assert again.changes == []
    assert again.schedule == result.schedule


# --- placement --------------------------------------------------------------------


def test_plan_places_on_least_loaded_machine_with_id_tie_break():
    units = by_name(unit("a.service"), unit("b.service"), unit("c.service"))

    result = plan(units, machines("m2", "m1"), {})

    assert result.schedule == {"a.service": "m1", "b.service": "m2", "c.service": "m1"}
    assert result.changes[0] == Decision("a.service", None, "m1", "least loaded")
    assert result.unplaceable == {}


def test_plan_counts_units_already_scheduled_as_load():
    units = by_name(unit("a.service"), unit("b.service"), unit("z.service"))

    result = plan(units, machines("m1", "m2"), {"a.service": "m1", "b.service": "m1"})

    assert result.schedule["z.service"] == "m2"
    assert [d.unit for d in result.changes] == ["z.service"]


def test_plan_is_deterministic_whatever_the_input_order():
    names = [f"u{i}.service" for i in range(40)]
    ids = [f"m{i}" for i in range(5)]
    results = []
    for seed in range(3):
        random.Random(seed).shuffle(names)
        random.Random(seed).shuffle(ids)
        results.append(plan(by_name(*(unit(n) for n in names)), machines(*ids), {}))

    assert results[0] == results[1] == results[2]


def test_plan_with_no_machines_leaves_units_unplaceable():
    result = plan(by_name(unit("a.service")), {}, {})

    assert result.schedule == {}
    assert result.unplaceable == {"a.service": "no machines are present"}


@pytest.mark.parametrize("state", [LOADED, LAUNCHED])
def test_plan_places_loaded_and_launched_units(state):
    assert plan(by_name(unit("a.service", state=state)), machines("m1"), {}).schedule == {"a.service": "m1"}


def test_plan_unschedules_inactive_unit():
    result = plan(by_name(unit("a.service", state=INACTIVE)), machines("m1"), {"a.service": "m1"})

    assert result.schedule == {}
    assert result.changes == [Decision("a.service", "m1", None, "desired state is inactive")]


def test_plan_unschedules_destroyed_unit():
    result = plan({}, machines("m1"), {"gone.service": "m1"})

    assert result.changes == [Decision("gone.service", "m1", None, "unit was destroyed")]


def test_plan_never_schedules_template():
    template = dataclasses.replace(unit("web@.service", state=INACTIVE), desired_state=LAUNCHED)

    result = plan(by_name(template), machines("m1"), {"web@.service": "m1"})

    assert result.schedule == {}
    assert result.unplaceable == {}
    assert result.changes[0].reason == "template units are never scheduled"


# --- stability and machine loss -------------------------------------------------


def test_plan_keeps_units_where_they_are_without_rebalancing():
    units = by_name(unit("a.service"), unit("b.service"), unit("c.service"))
    schedule = {"a.service": "m1", "b.service": "m1", "c.service": "m1"}

    result = plan(units, machines("m1", "m2", "m3"), schedule)

    assert result.schedule == schedule
    assert result.changes == []


def test_plan_moves_units_off_lost_machine_only():
    units = by_name(unit("a.service"), unit("b.service"), unit("c.service"))
    schedule = {"a.service": "m1", "b.service": "m2", "c.service": "m1"}

    result = plan(units, machines("m2", "m3"), schedule)

    assert result.schedule == {"a.service": "m3", "b.service": "m2", "c.service": "m2"}
    assert result.changes == [
        Decision("a.service", "m1", "m3", "machine m1 is gone; least loaded"),
        Decision("c.service", "m1", "m2", "machine m1 is gone; least loaded"),
    ]


def test_plan_reports_unit_that_cannot_move_off_lost_machine():
    units = by_name(unit("a.service", "MachineMetadata=disk=ssd"))

    result = plan(units, machines("m2", m2="disk=hdd"), {"a.service": "m1"})

    assert result.changes == [
        Decision(
            "a.service", "m1", None,
            "machine m1 is gone; cannot be placed: machine m2 does not have metadata disk=ssd",
        )
    ]  # fmt: skip


# --- MachineMetadata ------------------------------------------------------------------


def test_plan_metadata_same_key_is_or_different_keys_are_and():
    units = by_name(
        unit("both.service", "MachineMetadata=region=eu", "MachineMetadata=disk=ssd"),
        unit("either.service", "MachineMetadata=region=eu", "MachineMetadata=region=us"),
    )
    present = machines(
        "m1", "m2", "m3", "m4",
        m1="region=eu,disk=hdd", m2="region=us,disk=ssd", m3="region=eu,disk=ssd", m4="disk=ssd",
    )  # fmt: skip

    result = plan(units, present, {})

    assert result.schedule == {"both.service": "m3", "either.service": "m1"}
    assert_valid(result, units, present)


def test_plan_reports_missing_metadata():
    units = by_name(unit("a.service", "MachineMetadata=region=eu", "MachineMetadata=region=ap"))

    result = plan(units, machines("m1", "m2", m1="region=us"), {})

    assert result.unplaceable == {"a.service": "no machine has metadata region=ap|eu"}


def test_plan_moves_unit_when_its_machine_loses_metadata():
    units = by_name(unit("a.service", "MachineMetadata=region=eu"))
    present = machines("m1", "m2", m1="region=us", m2="region=eu")

    result = plan(units, present, {"a.service": "m1"})

    assert result.changes == [
        Decision("a.service", "m1", "m2", "machine m1 does not have metadata region=eu; least loaded")
    ]


# --- MachineID --------------------------------------------------------------------------


def test_plan_machine_id_exact_wins_over_prefix():
    units = by_name(unit("a.service", "MachineID=abc"))

    result = plan(units, machines("abc", "abcd"), {})

    assert result.schedule == {"a.service": "abc"}
    assert result.changes[0].reason == "MachineID abc"


def test_plan_machine_id_unique_prefix():
    units = by_name(unit("a.service", "MachineID=3d12"))

    assert plan(units, machines("3d1219c7aa", "77ab"), {}).schedule == {"a.service": "3d1219c7aa"}


def test_plan_machine_id_ambiguous_prefix_is_unplaceable():
    units = by_name(unit("a.service", "MachineID=3d"))

    result = plan(units, machines("3d12", "3d99", "77"), {})

    assert result.schedule == {}
    assert result.unplaceable["a.service"].startswith("MachineID 3d is ambiguous")


def test_plan_machine_id_ambiguous_prefix_keeps_unit_already_there():
    units = by_name(unit("a.service", "MachineID=3d"))

    result = plan(units, machines("3d12", "3d99"), {"a.service": "3d99"})

    assert result.changes == []


def test_plan_machine_id_unknown_is_unplaceable():
    result = plan(by_name(unit("a.service", "MachineID=zz")), machines("m1"), {})

    assert result.unplaceable == {"a.service": "no machine id is or starts with zz"}


# --- MachineOf ------------------------------------------------------------------------------


def test_plan_machine_of_places_peer_first_and_follows_it():
    units = by_name(
        unit("a-sidekick.service", "MachineOf=z-app.service"),
        unit("b.service"),
        unit("z-app.service"),
    )

    result = plan(units, machines("m1", "m2"), {"b.service": "m1"})

    assert result.schedule["z-app.service"] == "m2"
    assert result.schedule["a-sidekick.service"] == "m2"
    assert dict((d.unit, d.reason) for d in result.changes)["a-sidekick.service"] == "MachineOf z-app.service"


def test_plan_machine_of_follows_peer_when_peer_moves():
    units = by_name(unit("app.service"), unit("side.service", "MachineOf=app.service"))
    units["busy.service"] = unit("busy.service")
    schedule = {"app.service": "m1", "side.service": "m1", "busy.service": "m2"}

    result = plan(units, machines("m2", "m3"), schedule)

    assert result.schedule == {"app.service": "m3", "side.service": "m3", "busy.service": "m2"}
    assert_valid(result, units, machines("m2", "m3"))


def test_plan_machine_of_follows_peer_moved_by_metadata():
    units = by_name(unit("app.service", "MachineMetadata=region=eu"), unit("side.service", "MachineOf=app.service"))
    present = machines("m1", "m2", m1="region=us", m2="region=eu")

    result = plan(units, present, {"app.service": "m1", "side.service": "m1"})

    assert result.schedule == {"app.service": "m2", "side.service": "m2"}


@pytest.mark.parametrize(
    "peer, reason",
    [
        (None, "MachineOf peer db.service does not exist"),
        (INACTIVE, "MachineOf peer db.service has desired state inactive"),
    ],
)
def test_plan_machine_of_unscheduled_peer_is_unplaceable(peer, reason):
    units = by_name(unit("web.service", "MachineOf=db.service"))
    if peer is not None:
        units.update(by_name(unit("db.service", state=peer)))

    result = plan(units, machines("m1"), {"web.service": "m1"})

    assert result.unplaceable == {"web.service": reason}
    assert result.changes == [Decision("web.service", "m1", None, reason)]


def test_plan_machine_of_unplaceable_peer_makes_follower_unplaceable():
    units = by_name(unit("db.service", "MachineMetadata=disk=ssd"), unit("web.service", "MachineOf=db.service"))

    result = plan(units, machines("m1"), {})

    assert result.unplaceable["web.service"] == "MachineOf peer db.service cannot be placed"


def test_plan_machine_of_cycle_is_unplaceable():
    units = by_name(unit("a.service", "MachineOf=b.service"), unit("b.service", "MachineOf=a.service"))

    result = plan(units, machines("m1"), {})

    assert result.schedule == {}
    assert result.unplaceable["a.service"] == "MachineOf cycle: a.service -> b.service -> a.service"
    assert "b.service" in result.unplaceable


def test_plan_machine_of_global_peer_only_where_it_applies():
    units = by_name(
        unit("agent.service", "Global=true", "MachineMetadata=role=web"),
        unit("z.service", "MachineOf=agent.service"),
    )
    present = machines("m1", "m2", "m3", m2="role=web", m3="role=web")

    result = plan(units, present, {})

    assert result.schedule == {"z.service": "m2"}
    assert_valid(result, units, present)


def test_plan_machine_of_long_chain():
    chain = [unit(f"u{i:04}.service", f"MachineOf=u{i - 1:04}.service") for i in range(1, 1500)]
    units = by_name(unit("busy.service"), unit("u0000.service"), *chain)

    result = plan(units, machines("m1", "m2"), {"busy.service": "m1"})

    assert result.schedule.pop("busy.service") == "m1"
    assert set(result.schedule.values()) == {"m2"}
    assert len(result.schedule) == 1500


# --- Conflicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("holder", ["a.service", "b.service"])
def test_plan_conflicts_in_either_direction(holder):
    a = unit("a.service", "Conflicts=b.service") if holder == "a.service" else unit("a.service")
    b = unit("b.service", "Conflicts=a.service") if holder == "b.service" else unit("b.service")

    result = plan(by_name(a, b), machines("m1"), {})

    assert result.schedule == {"a.service": "m1"}
    assert result.unplaceable == {"b.service": "no eligible machine is free: conflicts with a.service on m1"}


def test_plan_conflicting_unit_goes_to_another_machine_even_if_busier():
    units = by_name(unit("a.service", "Conflicts=b*"), unit("b.service"), unit("c.service"))

    result = plan(units, machines("m1", "m2"), {"c.service": "m2", "a.service": "m1"})

    assert result.schedule["b.service"] == "m2"


def test_plan_conflicts_with_global_unit():
    units = by_name(unit("guard.service", "Global=true", "Conflicts=web*"), unit("web.service"))

    result = plan(units, machines("m1", "m2"), {})

    assert result.global_machines == {"guard.service": ["m1", "m2"]}
    assert result.unplaceable["web.service"].endswith("conflicts with guard.service on m2")


def test_plan_global_unit_skips_machine_with_conflicting_unit_already_there():
    units = by_name(unit("guard.service", "Global=true", "Conflicts=web*"), unit("web.service"))

    result = plan(units, machines("m1", "m2"), {"web.service": "m1"})

    assert result.global_machines == {"guard.service": ["m2"]}
    assert result.changes == []
    assert result.units_for_machine("m1") == {"web.service"}
    assert result.units_for_machine("m2") == {"guard.service"}


# --- global units ------------------------------------------------------------------------------------


def test_plan_global_unit_applies_on_matching_machines_only_and_counts_as_load():
    units = by_name(unit("mon.service", "Global=true", "MachineMetadata=role=web"), unit("a.service"))
    present = machines("m1", "m2", "m3", m1="role=web", m3="role=web")

    result = plan(units, present, {})

    assert result.global_machines == {"mon.service": ["m1", "m3"]}
    assert result.schedule == {"a.service": "m2"}
    assert "mon.service" not in result.schedule
    assert result.units_for_machine("m1") == {"mon.service"}
    assert result.units_for_machine("m2") == {"a.service"}


def test_plan_global_unit_inactive_applies_nowhere():
    units = by_name(unit("mon.service", "Global=true", state=INACTIVE))

    assert plan(units, machines("m1"), {}).global_machines == {}


def test_plan_unschedules_unit_that_became_global():
    result = plan(by_name(unit("mon.service", "Global=true")), machines("m1"), {"mon.service": "m1"})

    assert result.schedule == {}
    assert result.global_machines == {"mon.service": ["m1"]}
    assert result.changes[0].new_machine is None


def test_plan_globals_conflicting_with_each_other_first_by_name_wins():
    units = by_name(unit("a-global.service", "Global=true", "Conflicts=b-*"), unit("b-global.service", "Global=true"))

    result = plan(units, machines("m1"), {})

    assert result.global_machines == {"a-global.service": ["m1"], "b-global.service": []}


def test_global_targets_checks_metadata_and_conflicts_with_placed_units():
    mon = unit("mon.service", "Global=true", "MachineMetadata=role=web", "Conflicts=legacy*")
    present = machines("m1", "m2", "m3", "m4", m1="role=web", m2="role=web", m4="role=web")
    placed = {
        "m1": [unit("legacy.service")],
        "m2": (u for u in [unit("app.service")]),
        "m4": [unit("strict.service", "Conflicts=mon*")],
    }

    assert global_targets(mon, present, placed) == ["m2"]
    assert global_targets(mon, present, {}) == ["m1", "m2", "m4"]


def test_global_targets_rejects_non_global_unit():
    with pytest.raises(ValueError, match="not a global unit"):
        global_targets(unit("a.service"), machines("m1"), {})


# --- Replaces -----------------------------------------------------------------------------------------


def test_plan_replaces_moves_replaced_unit_elsewhere():
    units = by_name(unit("new.service", "Replaces=old.service", "MachineMetadata=region=eu"), unit("old.service"))
    present = machines("m1", "m2", m1="region=eu", m2="region=us")

    result = plan(units, present, {"old.service": "m1"})

    assert result.schedule == {"new.service": "m1", "old.service": "m2"}
    assert Decision("old.service", "m1", "m2", "replaced by new.service on m1; least loaded") in result.changes
    assert_valid(result, units, present)


def test_plan_replaces_checks_replaced_units_own_constraints():
    units = by_name(
        unit("new.service", "Replaces=old.service", "MachineMetadata=region=eu"),
        unit("old.service", "MachineMetadata=region=eu"),
    )
    present = machines("m1", "m2", m1="region=eu", m2="region=us")

    result = plan(units, present, {"old.service": "m1"})

    assert result.schedule == {"new.service": "m1"}
    assert "machine m2" not in result.unplaceable["old.service"]
    assert result.unplaceable["old.service"].startswith("no eligible machine is free: replaced by new.service on m1")


def test_plan_replaces_keeps_replaced_unit_off_replacers_machine():
    units = by_name(unit("new.service", "Replaces=old*"), unit("old.service"), unit("x.service"))

    result = plan(units, machines("m1", "m2"), {"new.service": "m1", "x.service": "m2"})

    assert result.schedule["old.service"] == "m2"


def test_plan_replaces_takes_over_when_both_already_on_same_machine():
    units = by_name(unit("a-new.service", "Replaces=z-old.service"), unit("z-old.service"))

    result = plan(units, machines("m1", "m2"), {"a-new.service": "m1", "z-old.service": "m1"})

    assert result.schedule == {"a-new.service": "m1", "z-old.service": "m2"}


def test_plan_replaces_follower_moves_with_replaced_unit():
    units = by_name(
        unit("new.service", "Replaces=old.service", "MachineMetadata=region=eu"),
        unit("old.service"),
        unit("side.service", "MachineOf=old.service"),
    )
    present = machines("m1", "m2", m1="region=eu")

    result = plan(units, present, {"old.service": "m1", "side.service": "m1"})

    assert result.schedule == {"new.service": "m1", "old.service": "m2", "side.service": "m2"}


def test_plan_circular_replaces_is_ignored():
    units = by_name(
        unit("a.service", "Replaces=b.service", "MachineMetadata=region=eu"),
        unit("b.service", "Replaces=a.service", "MachineMetadata=region=eu"),
    )
    present = machines("m1", "m2", m1="region=eu")

    result = plan(units, present, {})

    assert result.schedule == {"a.service": "m1", "b.service": "m1"}


def test_plan_replaces_cycle_through_several_units_is_ignored():
    units = by_name(
        unit("a.service", "Replaces=b.service"),
        unit("b.service", "Replaces=c.service"),
        unit("c.service", "Replaces=a.service"),
        unit("d.service", "Replaces=a.service"),
    )
    present = machines("m1", "m2")

    result = plan(units, present, {})

    assert result.schedule == {"a.service": "m1", "b.service": "m2", "c.service": "m1", "d.service": "m2"}
    assert plan(units, present, result.schedule).changes == []


def test_plan_replaces_chain_moves_each_unit_once():
    units = by_name(
        unit("a.service", "Replaces=b.service", "MachineMetadata=pin=1"),
        unit("b.service", "Replaces=c.service", "MachineMetadata=pin=1", "MachineMetadata=pin=2"),
        unit("c.service"),
    )
    present = machines("m1", "m2", "m3", m1="pin=1", m2="pin=2")

    result = plan(units, present, {"b.service": "m1", "c.service": "m2"})

    assert result.schedule == {"a.service": "m1", "b.service": "m2", "c.service": "m3"}
    assert [d.reason for d in result.changes] == [
        "least loaded",
        "replaced by a.service on m1; least loaded",
        "replaced by b.service on m2; least loaded",
    ]
    assert_valid(result, units, present)


def test_plan_replaces_cannot_displace_global_unit():
    units = by_name(unit("g.service", "Global=true"), unit("a.service", "Replaces=g.service"))

    result = plan(units, machines("m1"), {})

    assert "would replace global unit g.service on m1" in result.unplaceable["a.service"]


# --- templates and instances ----------------------------------------------------------------------------


def test_plan_schedules_each_instance_independently():
    template = unit("web@.service", "Conflicts=web@*.service", state=INACTIVE)
    instances = [instance_from_template(template, str(i), LAUNCHED) for i in (1, 2, 3)]
    units = by_name(template, *instances, instance_from_template(template, "4", INACTIVE))
    present = machines("m1", "m2", "m3")

    result = plan(units, present, {})

    assert result.schedule == {"web@1.service": "m1", "web@2.service": "m2", "web@3.service": "m3"}
    stopped = {**units, "web@2.service": units["web@2.service"].with_desired_state(INACTIVE)}
    after = plan(stopped, present, result.schedule)
    assert after.schedule == {"web@1.service": "m1", "web@3.service": "m3"}
    assert [d.unit for d in after.changes] == ["web@2.service"]


def test_plan_instance_specifiers_pair_instances():
    db = unit("db@.service", state=INACTIVE)
    web = unit("web@.service", "MachineOf=db@%i.service", state=INACTIVE)
    units = by_name(
        *(instance_from_template(db, str(i), LAUNCHED) for i in (1, 2)),
        *(instance_from_template(web, str(i), LAUNCHED) for i in (1, 2)),
    )
    present = machines("m1", "m2")

    result = plan(units, present, {})

    assert result.schedule["web@1.service"] == result.schedule["db@1.service"]
    assert result.schedule["web@2.service"] == result.schedule["db@2.service"]
    assert result.schedule["db@1.service"] != result.schedule["db@2.service"]


# --- scale --------------------------------------------------------------------------------------------


def test_plan_3000_units_on_4_machines():
    template = unit("app@.service", "Conflicts=app@%i-*", state=INACTIVE)
    units = by_name(*(instance_from_template(template, str(i), LAUNCHED) for i in range(3000)))
    present = machines("m1", "m2", "m3", "m4")

    result = plan(units, present, {})

    assert Counter(result.schedule.values()) == {"m1": 750, "m2": 750, "m3": 750, "m4": 750}
    assert len(result.changes) == 3000
    assert_valid(result, units, present)

    del present["m2"]
    after = plan(units, present, result.schedule)
    assert Counter(after.schedule.values()) == {"m1": 1000, "m3": 1000, "m4": 1000}
    assert {d.unit for d in after.changes} == {n for n, m in result.schedule.items() if m == "m2"}


def test_plan_3000_mixed_units_keep_every_constraint():
    rng = random.Random(7)
    present = machines(*(f"m{i}" for i in range(4)), m0="region=eu", m1="region=eu", m2="region=us", m3="region=us")
    units = by_name(
        unit("log.service", "Global=true"),
        unit("eu-agent.service", "Global=true", "MachineMetadata=region=eu", "Conflicts=solo-*"),
        *(unit(f"solo-{i}.service", "Conflicts=solo-*") for i in range(6)),
    )
    for i in range(1000):
        region = rng.choice(["eu", "us"])
        units.update(by_name(
            unit(f"db-{i:04}.service", f"MachineMetadata=region={region}"),
            unit(f"web-{i:04}.service", f"MachineOf=db-{i:04}.service"),
            unit(f"job-{i:04}.service", "Conflicts=job-000*" if i < 10 else "Conflicts=none"),
        ))  # fmt: skip

    result = plan(units, present, {})

    assert len(result.schedule) + len(result.unplaceable) == 3006
    assert set(result.unplaceable) <= {f"job-000{i}.service" for i in range(10)} | {
        f"solo-{i}.service" for i in range(6)
    }
    assert_valid(result, units, present)


# --- summary --------------------------------------------------------------------------------------------


def test_summarize_counts_and_lists_changes():
    units = by_name(unit("a.service"), unit("b.service"), unit("c.service", "MachineMetadata=region=eu"))

    result = plan(units, machines("m1", "m2"), {"b.service": "m9", "old.service": "m1"})

    assert summarize(result) == (
        "scheduled 1, moved 1, unscheduled 1, unplaceable 1: "
        "a.service -> m1 (least loaded), "
        "b.service m9 -> m2 (machine m9 is gone; least loaded), "
        "old.service m1 -> none (unit was destroyed), "
        "c.service unplaceable (no machine has metadata region=eu)"
    )


def test_summarize_truncates_long_lists():
    units = by_name(*(unit(f"u{i}.service") for i in range(12)))

    text = summarize(plan(units, machines("m1"), {}))

    assert text.startswith("scheduled 12, moved 0, unscheduled 0, unplaceable 0: u0.service -> m1")
    assert text.endswith(" ... and 7 more")


def test_summarize_without_changes():
    units = by_name(unit("a.service"))

    assert summarize(plan(units, machines("m1"), {"a.service": "m1"})) == "no changes; 1 unit scheduled"
