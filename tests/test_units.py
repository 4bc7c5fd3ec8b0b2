import json
from pathlib import Path

import pytest

from fleetkit.core.errors import UnitError
from fleetkit.core.unitfile import parse_unit_file
from fleetkit.core.units import (
    DESIRED_STATES,
    INACTIVE,
    KNOWN_OPTIONS,
    LAUNCHED,
    LOADED,
    OPTION_ALIASES,
    FleetOptions,
    Unit,
    UnitName,
    conflicts,
    instance_from_template,
    make_unit,
    mangle_unit_name,
    parse_fleet_options,
    replaces,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "units.md"


def fleet(name, *lines, state=INACTIVE):
    """A unit whose [X-Fleet] section holds `lines`."""
    text = "[Service]\nExecStart=/bin/true\n\n[X-Fleet]\n" + "".join(line + "\n" for line in lines)
    return make_unit(name, text, state)


def options(*lines, name="web.service"):
    return fleet(name, *lines).options


def problem(*lines, name="web.service"):
    with pytest.raises(UnitError) as info:
        fleet(name, *lines)
    return str(info.value)


# --- unit names -------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "web.service", "a.b.c.socket", "x:y_z-1.timer", "dev-sda1\\x2d.device", "web@.service",
        "web@1.service", "web@a@b.path", "app.target", "home.mount", "home.automount", "swap0.swap",
        "user.slice", "x" * 248 + ".service",
    ],
)  # fmt: skip
def test_unit_name_accepts_valid_name(name):
    assert UnitName.parse(name).name == name


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("", "empty"),
        ("web", "no type suffix"),
        ("web.", 'unknown type "."'),
        ("web.txt", 'unknown type ".txt"'),
        ("web.scope", 'unknown type ".scope"'),
        ("@web.service", 'starts with "@"'),
        (".service", 'nothing before ".service"'),
        ("web@1.mount", 'contains "@"'),
        ("web@.device", 'contains "@"'),
        ("we b.service", 'contains " "'),
        ("web/1.service", 'contains "/"'),
        ("w\u00e9b.service", 'contains "\u00e9"'),
        ("x" * 250 + ".service", "the limit is 256"),
    ],
)
def test_unit_name_rejects_invalid_name_saying_what_is_allowed(name, fragment):
    with pytest.raises(UnitError, match="unit name") as info:
        UnitName.parse(name)

    assert fragment in str(info.value)


def test_unit_name_parts_of_plain_template_and_instance():
    plain = UnitName.parse("web.service")
    template = UnitName.parse("web@.service")
    instance = UnitName.parse("web@3.service")

    assert (plain.prefix, plain.instance, plain.suffix, plain.template) == ("web", None, "service", None)
    assert not plain.is_template and not plain.is_instance
    assert (template.prefix, template.instance, template.template) == ("web", "", "web@.service")
    assert template.is_template and not template.is_instance
    assert (instance.prefix, instance.instance, instance.template) == ("web", "3", "web@.service")
    assert instance.is_instance and not instance.is_template
    assert instance.stem == "web@3"


@pytest.mark.parametrize(
    "argument, expected",
    [
        ("web", "web.service"),
        ("web.service", "web.service"),
        ("units/web.socket", "web.socket"),
        ("/abs/path/app.target", "app.target"),
        ("db.conf", "db.conf.service"),
        ("hello@1", "hello@1.service"),
        ("dir/", "dir.service"),
    ],
)
def test_mangle_unit_name_appends_service_unless_known_type(argument, expected):
    assert mangle_unit_name(argument) == expected


# --- [X-Fleet] options -------------------------------------------------------


def test_parse_without_fleet_section_gives_no_constraints():
    assert make_unit("a.service", "[Service]\nExecStart=/bin/true\n").options == FleetOptions()


def test_parse_machine_id():
    assert options("MachineID=abc123").machine_id == "abc123"


def test_parse_machine_of_keeps_exact_names_in_order():
    assert options("MachineOf=db.service", "MachineOf=cache.socket").machine_of == (
        "db.service",
        "cache.socket",
    )


def test_parse_machine_metadata_same_key_or_different_keys_and():
    parsed = options("MachineMetadata=region=eu", "MachineMetadata=region=us", "MachineMetadata=disk=ssd")

    assert parsed.machine_metadata == {"region": frozenset({"eu", "us"}), "disk": frozenset({"ssd"})}


def test_parse_machine_metadata_quoted_values_split_on_whitespace():
    parsed = options('MachineMetadata="region=us east" "disk=ssd"  "rack=r1"')

    assert parsed.machine_metadata == {
        "region": frozenset({"us east"}),
        "disk": frozenset({"ssd"}),
        "rack": frozenset({"r1"}),
    }


def test_parse_machine_metadata_allows_equals_in_value():
    assert options("MachineMetadata=label=a=b").machine_metadata == {"label": frozenset({"a=b"})}


@pytest.mark.parametrize(
    "line", ["MachineMetadata=region", "MachineMetadata==eu", "MachineMetadata=region=", 'MachineMetadata=""']
)
def test_parse_rejects_malformed_machine_metadata(line):
    assert "malformed" in problem(line) or "empty" in problem(line)


def test_parse_rejects_malformed_machine_metadata_among_good_ones():
    message = problem('MachineMetadata="region=eu" "ssd"')

    assert 'MachineMetadata entry "ssd" is malformed' in message
    assert "key=value" in message


def test_parse_conflicts_splits_on_whitespace():
    assert options("Conflicts=web@*.service  db.service", "Conflicts=x*").conflicts == (
        "web@*.service",
        "db.service",
        "x*",
    )


@pytest.mark.parametrize("value", ["true", "TRUE", "yes", "1", "on", "On"])
def test_parse_global_truthy(value):
    assert options(f"Global={value}").is_global


@pytest.mark.parametrize("value", ["false", "No", "0", "off"])
def test_parse_global_falsy(value):
    assert not options(f"Global={value}").is_global


def test_parse_global_last_value_wins():
    assert not options("Global=true", "Global=false").is_global


@pytest.mark.parametrize("value", ["t", "maybe", "2"])
def test_parse_rejects_global_that_is_not_boolean(value):
    assert f"Global={value} is not a boolean" in problem(f"Global={value}")


def test_parse_replaces_keeps_globs():
    assert options("Replaces=old-*.service").replaces == ("old-*.service",)


def test_parse_rejects_replaces_with_whitespace():
    assert "one Replaces= line per pattern" in problem("Replaces=a.service b.service")


@pytest.mark.parametrize(
    "alias, attribute, value, expected",
    [
        ("X-ConditionMachineID", "machine_id", "m1", "m1"),
        ("X-ConditionMachineBootID", "machine_id", "m1", "m1"),
        ("X-ConditionMachineOf", "machine_of", "db.service", ("db.service",)),
        ("X-ConditionMachineMetadata", "machine_metadata", "a=1", {"a": frozenset({"1"})}),
        ("X-Conflicts", "conflicts", "x*", ("x*",)),
    ],
)
def test_parse_accepts_old_fleet_aliases(alias, attribute, value, expected):
    assert getattr(options(f"{alias}={value}"), attribute) == expected
    assert OPTION_ALIASES[alias] in KNOWN_OPTIONS


def test_parse_rejects_unknown_option_with_suggestion():
    message = problem("MachineMetdata=region=eu")

    assert 'unknown option "MachineMetdata"' in message
    assert 'did you mean "MachineMetadata"?' in message


def test_parse_rejects_wrong_case_option_with_suggestion():
    assert 'did you mean "MachineID"?' in problem("machineid=abc")


def test_parse_rejects_empty_option_value():
    assert "MachineOf= is empty" in problem("MachineOf=")


def test_parse_rejects_several_machine_ids():
    assert "pinned to one machine only" in problem("MachineID=a", "MachineID=b")


def test_parse_rejects_machine_of_invalid_unit_name():
    message = problem("MachineOf=not a unit")

    assert 'MachineOf names "not a unit", which is not a valid unit name' in message


def test_parse_rejects_machine_of_itself():
    assert "names the unit itself" in problem("MachineOf=%n")


def test_parse_rejects_machine_of_template_from_non_template():
    assert "names a template" in problem("MachineOf=db@.service")


def test_parse_reports_every_problem_at_once():
    message = problem("Bogus=1", "Global=perhaps", "MachineMetadata=x")

    assert message.startswith("web.service: 3 problems in [X-Fleet]:")
    assert message.count("\n  - ") == 3


@pytest.mark.parametrize(
    "lines, pair",
    [
        (["MachineID=m1", "MachineOf=db.service"], "MachineID cannot be combined with MachineOf"),
        (["MachineID=m1", "Conflicts=x*"], "MachineID cannot be combined with Conflicts"),
        (["MachineID=m1", "Global=true"], "MachineID cannot be combined with Global"),
        (["MachineID=m1", "Replaces=x*"], "MachineID cannot be combined with Replaces"),
        (["Global=true", "MachineOf=db.service"], "Global cannot be combined with MachineOf"),
        (["Global=true", "Replaces=x*"], "Global cannot be combined with Replaces"),
        (["Conflicts=x*", "Replaces=y*"], "Conflicts cannot be combined with Replaces"),
    ],
)
def test_parse_rejects_contradictory_options(lines, pair):
    assert pair in problem(*lines)


@pytest.mark.parametrize(
    "lines",
    [
        ["Global=true", "MachineMetadata=a=1"],
        ["Global=true", "Conflicts=x*"],
        ["Global=false", "MachineID=m1"],
        ["MachineID=m1", "MachineMetadata=a=1"],
        ["MachineOf=db.service", "Conflicts=web@*.service"],
    ],
)
def test_parse_accepts_compatible_options(lines):
    assert isinstance(options(*lines), FleetOptions)


@pytest.mark.parametrize("option", ["Conflicts", "Replaces"])
def test_parse_rejects_machine_of_matched_by_own_pattern(option):
    message = problem("MachineOf=db.service", f"{option}=db*")

    assert f"MachineOf=db.service is matched by this unit's own {option}=db*" in message


def test_specifiers_substituted_in_fleet_section():
    unit = fleet(
        "web@3.service",
        "MachineOf=%p-sidekick@%i.service",
        "Conflicts=%N-* %n.bak",
        "MachineMetadata=load=100%%",
    )

    assert unit.options.machine_of == ("web-sidekick@3.service",)
    assert unit.options.conflicts == ("web@3-*", "web@3.service.bak")
    assert unit.options.machine_metadata == {"load": frozenset({"100%"})}


def test_specifiers_of_plain_unit():
    unit = fleet("db.service", "Conflicts=%p-%i-x")

    assert unit.options.conflicts == ("db--x",)


def test_specifiers_left_alone_outside_fleet_section():
    unit = make_unit("web@3.service", "[Service]\nExecStart=/bin/echo %i %n\n")

    assert unit.unit_file.value("Service", "ExecStart") == "/bin/echo %i %n"


@pytest.mark.parametrize("value", ["db%x.service", "db%"])
def test_parse_rejects_unknown_specifier(value):
    assert "unknown specifier" in problem(f"Conflicts={value}")


# --- units -------------------------------------------------------------------


def test_make_unit_fills_every_field():
    unit = make_unit("web.service", "[Unit]\nDescription=Web\n[Service]\nExecStart=/bin/true\n", LAUNCHED)

    assert unit.name == "web.service"
    assert unit.desired_state == LAUNCHED
    assert unit.hash == unit.unit_file.hash()
    assert unit.text == "[Unit]\nDescription=Web\n\n[Service]\nExecStart=/bin/true\n"
    assert unit.options == FleetOptions()


@pytest.mark.parametrize("state", DESIRED_STATES)
def test_make_unit_accepts_each_desired_state(state):
    assert fleet("a.service", state=state).desired_state == state


def test_make_unit_rejects_unknown_desired_state():
    with pytest.raises(UnitError, match='unknown desired state "running"; use one of inactive, loaded, launched'):
        fleet("a.service", state="running")


@pytest.mark.parametrize("state", [LOADED, LAUNCHED])
def test_make_unit_rejects_template_with_active_desired_state(state):
    with pytest.raises(UnitError, match="template and can only have desired state inactive"):
        fleet("web@.service", state=state)


def test_make_unit_error_names_unit_and_line():
    with pytest.raises(UnitError, match=r"^db\.service: line 2: "):
        make_unit("db.service", "[Service]\nExecStart /bin/true\n")


def test_make_unit_rejects_invalid_name():
    with pytest.raises(UnitError, match="unit name"):
        make_unit("db", "[Service]\nExecStart=/bin/true\n")


def test_with_desired_state_validates():
    unit = fleet("a.service")

    assert unit.with_desired_state(LAUNCHED).desired_state == LAUNCHED
    with pytest.raises(UnitError):
        unit.with_desired_state("bogus")


def test_json_round_trip():
    unit = fleet("web@2.service", "Conflicts=web@*.service", state=LOADED)

    data = unit.to_json()

    assert json.loads(data) == {
        "name": "web@2.service",
        "unit_file": unit.text,
        "hash": unit.hash,
        "desired_state": "loaded",
    }
    assert Unit.from_json(data) == unit


def test_from_json_rejects_hash_mismatch():
    record = json.loads(fleet("a.service").to_json())
    record["hash"] = "0" * 40

    with pytest.raises(UnitError, match="does not match"):
        Unit.from_json(json.dumps(record).encode())


@pytest.mark.parametrize("data", [b"not json", b"[]", b'{"name": "a.service"}', b"\xff"])
def test_from_json_rejects_malformed_record(data):
    with pytest.raises(UnitError, match="stored unit record"):
        Unit.from_json(data)


def test_units_are_hashable():
    unit = fleet("a.service", "MachineMetadata=a=1")

    assert {unit, fleet("a.service", "MachineMetadata=a=1")} == {unit}


# --- templates and instances ---------------------------------------------------


def test_instance_from_template_substitutes_instance_and_shares_hash():
    template = fleet("web@.service", "MachineOf=db@%i.service", "Conflicts=web@*.service")

    instance = instance_from_template(template, "7", LAUNCHED)

    assert instance.name == "web@7.service"
    assert instance.hash == template.hash
    assert instance.text == template.text
    assert instance.desired_state == LAUNCHED
    assert instance.options.machine_of == ("db@7.service",)
    assert template.options.machine_of == ("db@.service",)


def test_instance_from_template_accepts_full_name():
    template = fleet("web@.service")

    assert instance_from_template(template, "web@x.service").name == "web@x.service"


@pytest.mark.parametrize("instance", ["db@1.service", "web@1.socket", "web@.service", ""])
def test_instance_from_template_rejects_name_of_other_template(instance):
    with pytest.raises(UnitError):
        instance_from_template(fleet("web@.service"), instance)


def test_instance_from_template_rejects_non_template():
    with pytest.raises(UnitError, match="is not a template"):
        instance_from_template(fleet("web.service"), "1")


# --- conflicts -------------------------------------------------------------------


def test_conflicts_in_either_direction():
    web = fleet("web@1.service", "Conflicts=db*")
    db = fleet("db.service")
    other = fleet("cache.service")

    assert conflicts(web, db)
    assert conflicts(db, web)
    assert not conflicts(web, other)


def test_conflicts_not_with_itself():
    web = fleet("web@1.service", "Conflicts=web@*.service")

    assert not conflicts(web, web)
    assert conflicts(web, fleet("web@2.service"))


def test_replaces_one_direction():
    new = fleet("new.service", "Replaces=old.service")
    old = fleet("old.service")

    assert replaces(new, old)
    assert not replaces(old, new)


def test_parse_fleet_options_directly():
    unit_file = parse_unit_file("[X-Fleet]\nMachineOf=%p.socket\n")

    assert parse_fleet_options(unit_file, UnitName.parse("foo.service")).machine_of == ("foo.socket",)


# --- documentation -----------------------------------------------------------------


@pytest.mark.parametrize("option", [*KNOWN_OPTIONS, *OPTION_ALIASES])
def test_every_fleet_option_is_documented(option):
    assert f"`{option}`" in DOCS.read_text()


@pytest.mark.parametrize("section", ["X-Flet", "X-fleet", "X-Fleets"])
def test_misspelt_fleet_section_rejected(section):
    text = f"[Service]\nExecStart=/bin/true\n\n[{section}]\nGlobal=true\n"

    with pytest.raises(UnitError, match=r"misspelt \[X-Fleet\]"):
        make_unit("typo.service", text)


def test_other_x_sections_allowed():
    unit = make_unit("custom.service", "[Service]\nExecStart=/bin/true\n\n[X-Deploy]\nTeam=web\n")

    assert unit.unit_file.values("X-Deploy", "Team") == ["web"]
