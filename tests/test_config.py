"""Tests for fleetkit.core.config and fleetkit.core.durations."""

from __future__ import annotations

import dataclasses
import re
import socket
import tomllib
from pathlib import Path

import pytest

from fleetkit.core import config as config_module
from fleetkit.core.config import (
    SCHEMA,
    Config,
    RuntimeConfig,
    TransportConfig,
    check_config,
    default_node_name,
    endpoint_address,
    load_config,
    parse_config,
)
from fleetkit.core.durations import DurationError, format_duration, parse_duration
from fleetkit.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

FULL_FILE = """
[node]
name = "web-1"
metadata = { region = "eu", disk = "ssd" }
public_ip = "192.0.2.10"
state_dir = "/srv/fleetkit"

[storage]
backend = "etcd3"
endpoints = ["http://127.0.0.1:2379", "https://127.0.0.2:22379"]
prefix = "/cluster-a/"
dial_timeout = "2s"
request_timeout = "1500ms"

[transport]
mode = "grpc"
listen = "[::1]:7070"
advertise = "192.0.2.10:7070"

[engine]
enabled = false
lease_ttl = "1m"
reconcile_interval = "2.5s"

[agent]
ttl = "45s"

[runtime]
backend = "systemd"
bus = "unix:path=/run/user/1000/bus"
unit_directory = "/etc/systemd/system"

[api]
listen = "127.0.0.1:7071"

[log]
level = "debug"
format = "json"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(data: dict, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env=env or {}, source="test")
    return caught.value.problems


# ---------------------------------------------------------------- files


def test_load_full_file(tmp_path):
    config = load_config(write(tmp_path, FULL_FILE), env={})

    assert config.node.name == "web-1"
    assert config.node.metadata == {"region": "eu", "disk": "ssd"}
    assert config.node.public_ip == "192.0.2.10"
    assert config.node.state_dir == "/srv/fleetkit"
    assert config.storage.endpoints == ("http://127.0.0.1:2379", "https://127.0.0.2:22379")
    assert config.storage.prefix == "/cluster-a/"
    assert config.storage.dial_timeout == 2.0
    assert config.storage.request_timeout == 1.5
    assert config.transport.listen == "[::1]:7070"
    assert config.transport.advertise == "192.0.2.10:7070"
    assert config.engine.enabled is False
    assert config.engine.lease_ttl == 60.0
    assert config.engine.reconcile_interval == 2.5
    assert config.agent.ttl == 45.0
    assert config.runtime.bus == "unix:path=/run/user/1000/bus"
    assert config.runtime.unit_directory == "/etc/systemd/system"
    assert config.api.listen == "127.0.0.1:7071"
    assert config.log.level == "debug"
    assert config.log.format == "json"
    assert config.source == str(tmp_path / "cluster.toml")


def test_load_empty_file_gives_defaults(tmp_path):
    config = load_config(write(tmp_path, ""), env={})

    assert config.node.name == default_node_name()
    assert config.node.metadata == {}
    assert config.node.public_ip == ""
    assert config.node.state_dir == "/var/lib/fleetkit"
    assert config.storage.backend == "etcd3"
    assert config.storage.endpoints == ("http://127.0.0.1:2379",)
    assert config.storage.prefix == "/fleetkit/"
    assert config.storage.dial_timeout == 5.0
    assert config.storage.request_timeout == 5.0
    assert config.transport.mode == "grpc"
    assert config.transport.listen == "127.0.0.1:7070"
    assert config.transport.advertise == ""
    assert config.engine.enabled is True
    assert config.engine.lease_ttl == 10.0
    assert config.engine.reconcile_interval == 5.0
    assert config.agent.ttl == 30.0
    assert config.runtime.backend == "systemd"
    assert config.runtime.bus == "system"
    assert config.runtime.unit_directory == ""
    assert config.api.listen == "unix:///run/fleetkit/fleetkit.sock"
    assert config.log.level == "info"
    assert config.log.format == "text"


def test_load_none_path_uses_defaults():
    config = load_config(None, env={})

    assert config.source == "<defaults>"
    assert config.storage == config_module.StorageConfig()


def test_load_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.toml"

    with pytest.raises(ConfigError) as caught:
        load_config(missing, env={})

    assert len(caught.value.problems) == 1
    assert str(missing) in caught.value.problems[0]
    assert "not found" in caught.value.problems[0]


def test_load_syntax_error_names_line(tmp_path):
    path = write(tmp_path, '[node]\nname = "a"\nmetadata = { region = }\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})

    problem = caught.value.problems[0]
    assert problem.startswith(f"{path}, line 3,")
    assert "invalid TOML" in problem


def test_load_non_utf8_file_is_error(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_bytes(b'[node]\nname = "\xff"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})

    assert "UTF-8" in caught.value.problems[0]


# ---------------------------------------------------------------- value errors

TYPE_ERRORS = [
    ({"node": {"name": 5}}, 'node.name = 5: expected a string, got an integer'),
    ({"node": {"name": "-bad"}}, 'node.name = "-bad": invalid node name'),
    ({"node": {"name": "a" * 65}}, "invalid node name"),
    ({"node": {"metadata": "eu"}}, 'node.metadata = "eu": expected a table, got a string'),
    ({"node": {"metadata": {"region": 1}}}, "node.metadata.region = 1: expected a string, got an integer"),
    ({"node": {"metadata": {"a b": "x"}}}, 'node.metadata."a b" = "a b": invalid metadata key'),
    ({"node": {"public_ip": "10.0.0"}}, 'node.public_ip = "10.0.0": not an IP address'),
    ({"node": {"public_ip": "0.0.0.0"}}, "unspecified address"),
    ({"node": {"state_dir": "var/lib"}}, 'node.state_dir = "var/lib": must be an absolute path'),
    ({"storage": {"backend": "etcd"}}, 'storage.backend = "etcd": unknown backend; choose one of: etcd3'),
    ({"storage": {"endpoints": "http://127.0.0.1:2379"}}, "expected an array, got a string"),
    ({"storage": {"endpoints": []}}, "storage.endpoints = []: needs at least one endpoint"),
    ({"storage": {"endpoints": ["127.0.0.1:2379"]}}, 'storage.endpoints[0] = "127.0.0.1:2379": expected an http://'),
    ({"storage": {"endpoints": ["http://127.0.0.1"]}}, "storage.endpoints[0]"),
    ({"storage": {"endpoints": ["http://127.0.0.1:2379", 7]}}, "storage.endpoints[1] = 7: expected a string"),
    ({"storage": {"prefix": "fleetkit"}}, 'storage.prefix = "fleetkit": must start and end with "/"'),
    ({"storage": {"dial_timeout": "0s"}}, "storage.dial_timeout = \"0s\": must be greater than zero"),
    ({"storage": {"request_timeout": 5}}, 'storage.request_timeout = 5: a duration needs a unit, for example "5s"'),
    ({"transport": {"mode": "http"}}, "unknown mode"),
    ({"transport": {"listen": "7070"}}, 'transport.listen = "7070": expected host:port'),
    ({"transport": {"listen": "::1:7070"}}, 'needs brackets, for example "[::1]:7070"'),
    ({"transport": {"listen": "127.0.0.1:70000"}}, "port 70000 is out of range"),
    ({"transport": {"listen": "[nothost]:7070"}}, "invalid IPv6 address"),
    ({"transport": {"advertise": "0.0.0.0:7070"}}, "other machines cannot connect"),
    ({"engine": {"enabled": "yes"}}, 'engine.enabled = "yes": expected a boolean, got a string'),
    ({"engine": {"lease_ttl": "10"}}, 'engine.lease_ttl = "10": a duration needs a unit, for example "10s"'),
    ({"engine": {"lease_ttl": "1s"}}, 'engine.lease_ttl = "1s": must be at least 2s, for example "10s"'),
    ({"engine": {"lease_ttl": "-5s"}}, "cannot have a sign"),
    ({"engine": {"reconcile_interval": "0ms"}}, "must be greater than zero"),
    ({"agent": {"ttl": "1500ms"}}, "agent.ttl = \"1500ms\": must be at least 2s"),
    ({"agent": {"ttl": "ten seconds"}}, "invalid duration"),
    ({"runtime": {"backend": "openrc"}}, "unknown backend; choose one of: systemd"),
    ({"runtime": {"bus": "session"}}, 'runtime.bus = "session": expected "system", "user" or a D-Bus address'),
    ({"runtime": {"bus": "unix:path"}}, "expected \"system\", \"user\" or a D-Bus address"),
    ({"runtime": {"bus": "unix:guid=abc"}}, "needs one of abstract, path"),
    ({"runtime": {"bus": "tcp:host=127.0.0.1,port=5"}}, "cannot derive the unit directory"),
    ({"runtime": {"unit_directory": "run/units"}}, "must be an absolute path"),
    ({"api": {"listen": "unix://run/x"}}, 'api.listen = "unix://run/x": a unix socket needs an absolute path '
                                          'after "unix://", for example "unix:///run/x"'),
    ({"api": {"listen": "unix:/run/x"}}, 'for example "unix:///run/x"'),
    ({"api": {"listen": "127.0.0.1:0"}}, "needs a fixed port"),
    ({"api": {"listen": "unix:///" + "s" * 107}}, "longer than 107 bytes"),
    ({"log": {"level": "warn"}}, 'unknown level; choose one of: debug, error, info, warning; did you mean "warning"?'),
    ({"log": {"format": "yaml"}}, "unknown format; choose one of: json, text"),
]


@pytest.mark.parametrize(("data", "expected"), TYPE_ERRORS, ids=[item[1][:40] for item in TYPE_ERRORS])
def test_parse_invalid_value_reports_key(data, expected):
    problems = problems_of(data)

    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_parse_section_not_table_is_error():
    problems = problems_of({"engine": "on"})

    assert problems == ['engine = "on": expected a table; write [engine] as a section header']


def test_unknown_key_suggests_closest():
    problems = problems_of({"storage": {"endpoint": ["http://127.0.0.1:2379"]}})

    assert problems == ['storage.endpoint: unknown key; did you mean "storage.endpoints"?']


def test_unknown_key_without_match_lists_keys():
    problems = problems_of({"log": {"zzz": 1}})

    assert problems == ["log.zzz: unknown key; known keys in [log]: level, format"]


def test_unknown_section_suggests_closest():
    problems = problems_of({"storag": {}})

    assert problems == ['storag: unknown section; did you mean "storage"?']


def test_unknown_section_suggests_moved_key():
    problems = problems_of({"lease_ttl": "10s"})

    assert problems == ['lease_ttl: unknown section; did you mean "engine.lease_ttl"?']


def test_parse_lists_all_problems_at_once():
    data = {
        "storag": {},
        "storage": {"endpoint": [], "prefix": "x"},
        "engine": {"lease_ttl": "10", "reconcile_interval": 5},
        "node": {"metadata": {"a b": "x", "c": 1}},
        "log": {"level": "loud"},
        "runtime": {"bus": "tcp:host=127.0.0.1,port=5"},
    }

    problems = problems_of(data, env={"FLEETKIT_AGENT_TTL": "1s"})

    assert len(problems) == 10, problems
    joined = "\n".join(problems)
    for fragment in ("storag:", "storage.endpoint:", "storage.prefix", "engine.lease_ttl", "reconcile_interval",
                     'node.metadata."a b"', "node.metadata.c", "log.level", "FLEETKIT_AGENT_TTL",
                     "cannot derive the unit directory"):
        assert fragment in joined


def test_parse_masks_url_password_in_problem():
    problems = problems_of({"storage": {"endpoints": ["http://root:hunter2@127.0.0.1"]}})

    assert "hunter2" not in problems[0]
    assert "root:***@127.0.0.1" in problems[0]


def test_parse_default_node_name_invalid(monkeypatch, tmp_path):
    monkeypatch.setattr(config_module, "MACHINE_ID_PATH", str(tmp_path / "missing"))
    monkeypatch.setattr(socket, "gethostname", lambda: "bad host")

    problems = problems_of({})

    assert problems == ['node.name (default) = "bad host": invalid node name; use 1 to 64 letters, digits, '
                        "'.', '_' or '-', starting with a letter or digit; set node.name explicitly"]


def test_default_node_name_reads_machine_id(tmp_path):
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n", encoding="ascii")

    assert default_node_name(str(machine_id)) == "0123456789abcdef0123456789abcdef"


def test_default_node_name_falls_back_to_host(tmp_path):
    empty = tmp_path / "machine-id"
    empty.write_text("", encoding="ascii")

    assert default_node_name(str(empty)) == socket.gethostname()
    assert default_node_name(str(tmp_path / "missing")) == socket.gethostname()


def test_parse_backend_choices_follow_known_set():
    config_module.KNOWN_STORAGE_BACKENDS.add("redis")
    try:
        config = parse_config({"storage": {"backend": "redis"}}, env={}, source="test")
    finally:
        config_module.KNOWN_STORAGE_BACKENDS.discard("redis")

    assert config.storage.backend == "redis"
    assert problems_of({"storage": {"backend": "redis"}})


def test_parse_backend_choices_argument():
    config = parse_config({"storage": {"backend": "embedded"}}, env={}, source="test",
                          choices={"storage.backend": {"etcd3", "embedded"}})

    assert config.storage.backend == "embedded"


# ---------------------------------------------------------------- environment


def test_env_overrides_each_kind():
    env = {
        "FLEETKIT_NODE_NAME": "db-2",
        "FLEETKIT_STORAGE_ENDPOINTS": "http://127.0.0.1:2379, http://127.0.0.1:22379",
        "FLEETKIT_NODE_METADATA": "region=eu,disk=ssd",
        "FLEETKIT_ENGINE_ENABLED": "false",
        "FLEETKIT_ENGINE_LEASE_TTL": "20s",
    }

    config = parse_config({"node": {"name": "from-file"}, "engine": {"enabled": True}}, env=env, source="test")

    assert config.node.name == "db-2"
    assert config.storage.endpoints == ("http://127.0.0.1:2379", "http://127.0.0.1:22379")
    assert config.node.metadata == {"region": "eu", "disk": "ssd"}
    assert config.engine.enabled is False
    assert config.engine.lease_ttl == 20.0


def test_env_boolean_accepts_digits():
    config = parse_config({}, env={"FLEETKIT_ENGINE_ENABLED": "0"}, source="test")

    assert config.engine.enabled is False


def test_env_invalid_value_names_variable():
    problems = problems_of({}, env={"FLEETKIT_ENGINE_LEASE_TTL": "10", "FLEETKIT_ENGINE_ENABLED": "maybe"})

    assert problems == [
        'FLEETKIT_ENGINE_ENABLED: engine.enabled = "maybe": expected true or false, for example "false"',
        'FLEETKIT_ENGINE_LEASE_TTL: engine.lease_ttl = "10": a duration needs a unit, for example "10s"',
    ]


def test_env_invalid_metadata_item():
    problems = problems_of({}, env={"FLEETKIT_NODE_METADATA": "region"})

    assert problems == ['FLEETKIT_NODE_METADATA: node.metadata = "region": expected KEY=VALUE items separated '
                        'by commas, for example "region=eu,disk=ssd"']


def test_env_empty_endpoints_is_error():
    problems = problems_of({}, env={"FLEETKIT_STORAGE_ENDPOINTS": ""})

    assert problems[0].startswith('FLEETKIT_STORAGE_ENDPOINTS: storage.endpoints = "": needs at least one')


def test_env_unknown_key_suggests_variable():
    problems = problems_of({}, env={"FLEETKIT_STORAGE_ENDPOINT": "http://127.0.0.1:2379"})

    assert problems == ["FLEETKIT_STORAGE_ENDPOINT: unknown setting, [storage] has no key 'endpoint'; "
                        "did you mean FLEETKIT_STORAGE_ENDPOINTS?"]


def test_env_ignores_client_and_foreign_variables():
    env = {"FLEETKIT_ENDPOINT": "unix:///x", "FLEETKIT_DEBUG": "1", "OTHER_NODE_NAME": "x"}

    config = parse_config({}, env=env, source="test")

    assert config.api.listen == "unix:///run/fleetkit/fleetkit.sock"


# ---------------------------------------------------------------- durations

DURATIONS = [
    ("10s", 10.0), ("500ms", 0.5), ("1m30s", 90.0), ("2h", 7200.0), ("1.5s", 1.5), (".5s", 0.5),
    ("1h1m1s", 3661.0), ("250us", 0.00025), ("250µs", 0.00025), ("100ns", 1e-7), (" 3s ", 3.0), ("0s", 0.0),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_parse_duration_valid(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


BAD_DURATIONS = [
    ("10", 'needs a unit, for example "10s"'), ("0", "needs a unit"), ("1.5", 'for example "1.5s"'),
    ("-5s", "cannot have a sign"), ("+5s", "cannot have a sign"), ("", "must not be empty"),
    ("10 s", "invalid duration"), ("10sec", "invalid duration"), ("1d", "invalid duration"),
    ("s", "invalid duration"), ("1e3s", "invalid duration"), ("5s10", "invalid duration"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_DURATIONS)
def test_parse_duration_invalid(text, expected):
    with pytest.raises(DurationError, match=re.escape(expected)):
        parse_duration(text)


def test_parse_duration_rejects_number_type():
    with pytest.raises(DurationError, match="must be a string"):
        parse_duration(10)  # type: ignore[arg-type]


@pytest.mark.parametrize(("seconds", "text"), [
    (10.0, "10s"), (0.5, "500ms"), (90.0, "1m30s"), (7200.0, "2h"), (1.5, "1.5s"), (0.0, "0s"), (3661.0, "1h1m1s"),
])
def test_format_duration_round_trips(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


# ---------------------------------------------------------------- derived values


@pytest.mark.parametrize(("transport", "public_ip", "expected"), [
    (TransportConfig(listen="127.0.0.1:7070"), "", "127.0.0.1:7070"),
    (TransportConfig(listen="0.0.0.0:7070"), "192.0.2.10", "192.0.2.10:7070"),
    (TransportConfig(listen="[::]:7070"), "2001:db8::1", "[2001:db8::1]:7070"),
    (TransportConfig(listen="0.0.0.0:7070", advertise="node1.example:8080"), "192.0.2.10", "node1.example:8080"),
    (TransportConfig(listen="[::1]:7070"), "192.0.2.10", "[::1]:7070"),
])
def test_advertise_address_derivation(transport, public_ip, expected):
    assert transport.advertise_address(public_ip) == expected


def test_advertise_address_uses_bound_port():
    transport = TransportConfig(listen="0.0.0.0:0")

    assert transport.advertise_address("192.0.2.10", bound_port=41000) == "192.0.2.10:41000"


def test_advertise_address_unspecified_without_ip():
    with pytest.raises(ConfigError, match="set node.public_ip or transport.advertise"):
        TransportConfig(listen="0.0.0.0:7070").advertise_address("")


def test_advertise_address_port_zero_without_bound_port():
    with pytest.raises(ConfigError, match="port 0 cannot be advertised"):
        TransportConfig(listen="127.0.0.1:0").advertise_address("")


@pytest.mark.parametrize(("runtime", "env", "expected"), [
    (RuntimeConfig(bus="system"), {}, "/run/systemd/system"),
    (RuntimeConfig(bus="user"), {"XDG_RUNTIME_DIR": "/run/user/1000"}, "/run/user/1000/systemd/user"),
    (RuntimeConfig(bus="unix:path=/tmp/fk-test/bus"), {}, "/tmp/fk-test/systemd/user"),
    (RuntimeConfig(bus="unix:path=/run/dbus/system_bus_socket"), {}, "/run/systemd/system"),
    (RuntimeConfig(bus="user", unit_directory="/etc/units"), {}, "/etc/units"),
])
def test_unit_directory_derivation(runtime, env, expected):
    assert runtime.resolved_unit_directory(env) == expected


def test_unit_directory_user_bus_needs_runtime_dir():
    with pytest.raises(ConfigError, match="XDG_RUNTIME_DIR"):
        RuntimeConfig(bus="user").resolved_unit_directory({})


@pytest.mark.parametrize(("value", "expected"), [
    ("unix:///run/fleetkit/fleetkit.sock", "unix:///run/fleetkit/fleetkit.sock"),
    ("/run/fleetkit/fleetkit.sock", "unix:///run/fleetkit/fleetkit.sock"),
    ("127.0.0.1:7071", "127.0.0.1:7071"),
    ("[::1]:7071", "[::1]:7071"),
    ("0.0.0.0:7071", "127.0.0.1:7071"),
    ("[::]:7071", "[::1]:7071"),
    ("localhost:7071", "localhost:7071"),
])
def test_endpoint_address_converts(value, expected):
    assert endpoint_address(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("unix://run/x", 'for example "unix:///run/x"'),
    ("7071", "expected host:port"),
    ("http://127.0.0.1:7071", "a URL is not accepted here"),
    ("host name:7071", "invalid host"),
])
def test_endpoint_address_rejects_bad_form(value, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        endpoint_address(value)


def test_redacted_masks_url_password():
    data = {"storage": {"endpoints": ["https://root:hunter2@127.0.0.1:2379"]}}
    config = parse_config(data, env={}, source="test")

    display = config.redacted()

    assert display["storage"]["endpoints"] == ["https://root:***@127.0.0.1:2379"]
    assert display["engine"]["lease_ttl"] == "10s"
    assert display["source"] == "test"
    assert "hunter2" not in repr(display)


# ---------------------------------------------------------------- check_config


def test_check_config_warns_short_lease(tmp_path):
    path = write(tmp_path, '[engine]\nlease_ttl = "6s"\nreconcile_interval = "5s"\n')

    _, warnings = check_config(path, env={})

    assert any(warning.startswith("engine.lease_ttl (6s) is less than twice") for warning in warnings)


def test_check_config_defaults_have_no_warnings():
    _, warnings = check_config(None, env={})

    assert warnings == []


def test_check_config_warns_unresolvable_unit_directory(tmp_path):
    path = write(tmp_path, '[runtime]\nbus = "user"\n')

    _, warnings = check_config(path, env={})

    assert any("XDG_RUNTIME_DIR" in warning for warning in warnings)


def test_check_config_warns_local_listen_remote_store(tmp_path):
    path = write(tmp_path, '[storage]\nendpoints = ["http://192.0.2.1:2379"]\n')

    _, warnings = check_config(path, env={})

    assert any(warning.startswith('transport.listen = "127.0.0.1:7070" accepts only local') for warning in warnings)


def test_check_config_raises_on_invalid(tmp_path):
    with pytest.raises(ConfigError):
        check_config(write(tmp_path, '[engine]\nlease_ttl = "1"\n'), env={})


# ---------------------------------------------------------------- schema and docs


def test_schema_matches_dataclasses():
    for section in SCHEMA.values():
        field_names = [item.name for item in dataclasses.fields(section.factory)]
        assert [spec.name for spec in section.keys] == field_names, section.name
    assert set(SCHEMA) <= {item.name for item in dataclasses.fields(Config)}


def test_docs_cover_every_key():
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")

    for section in SCHEMA.values():
        assert f"[{section.name}]" in text, section.name
        for spec in section.keys:
            assert f"`{section.name}.{spec.name}`" in text, f"{section.name}.{spec.name}"
            assert f"FLEETKIT_{section.name.upper()}_{spec.name.upper()}" in text, spec.name


def test_docs_example_is_valid():
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    example = re.search(r"```toml\n(.*?)```", text, re.DOTALL)

    assert example is not None
    parse_config(tomllib.loads(example.group(1)), env={}, source="docs/config.md")


def test_example_file_is_valid():
    config = load_config(REPO / "examples" / "cluster.toml", env={})

    assert config.source.endswith("cluster.toml")
