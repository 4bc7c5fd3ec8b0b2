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
from fleetkit.core.tls import init_ca, issue

REPO = Path(__file__).resolve().parent.parent

FULL_FILE = """
[node]
name = "web-1"
metadata = { region = "eu", disk = "ssd" }
public_ip = "192.0.2.10"
state_dir = "/srv/fleetkit"

[storage]
backend = "etcd2"
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
    assert config.storage.backend == "embedded"
    assert config.storage.endpoints == ()
    assert config.storage.username == ""
    assert config.storage.password == ""
    assert config.storage.ca_file == config.storage.cert_file == config.storage.key_file == ""
    assert config.storage.path == "/var/lib/fleetkit/store.db"
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
    assert config.storage == config_module.StorageConfig(path="/var/lib/fleetkit/store.db")


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
    ({"storage": {"backend": "etcd"}},
     'storage.backend = "etcd": unknown backend; choose one of: embedded, etcd2, etcd3, redis; did you mean'),
    ({"storage": {"backend": "etcd3", "endpoints": "http://127.0.0.1:2379"}}, "expected an array, got a string"),
    ({"storage": {"backend": "etcd3", "endpoints": ["http://127.0.0.1:2379", 7]}},
     "storage.endpoints[1] = 7: expected a string"),
    ({"storage": {"password": 5}}, 'storage.password = "***": expected a string, got an integer'),
    ({"storage": {"ca_file": "ca.pem"}}, 'storage.ca_file = "ca.pem": must be an absolute path, for example "/ca.pem"'),
    ({"storage": {"path": "store.db"}}, 'storage.path = "store.db": must be an absolute path'),
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
    ({"runtime": {"backend": "openrc"}}, "unknown backend; choose one of: simulated, systemd"),
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
    problems = problems_of({"storage": {"backend": "etcd3", "endpoints": ["http://root:hunter2@127.0.0.1"]}})

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
    config_module.KNOWN_STORAGE_BACKENDS.add("consul")
    try:
        config = parse_config({"storage": {"backend": "consul"}}, env={}, source="test")
    finally:
        config_module.KNOWN_STORAGE_BACKENDS.discard("consul")

    assert config.storage.backend == "consul"
    assert config.storage.path == ""
    assert problems_of({"storage": {"backend": "consul"}})


def test_known_storage_backends():
    assert config_module.KNOWN_STORAGE_BACKENDS >= {"etcd3", "etcd2", "redis", "embedded"}


def test_parse_backend_choices_argument():
    config = parse_config({"storage": {"backend": "embedded"}}, env={}, source="test",
                          choices={"storage.backend": {"etcd3", "embedded"}})

    assert config.storage.backend == "embedded"


# ---------------------------------------------------------------- storage


@pytest.fixture
def pem(tmp_path):
    """Return a function that creates an (empty) PEM file under tmp_path and returns its path."""
    def make(name: str) -> str:
        path = tmp_path / name
        path.write_text("-----BEGIN CERTIFICATE-----\n", encoding="ascii")
        return str(path)

    return make


def storage(**keys) -> dict:
    return {"storage": keys}


VALID_STORES = [
    storage(),
    storage(backend="embedded", path="/srv/fleetkit/cluster.db"),
    storage(backend="etcd2", endpoints=["http://127.0.0.1:2379", "https://[2001:db8::1]:2379/"]),
    storage(backend="etcd2", endpoints=["http://etcd.example:2379"], username="fleet", password="pw"),
    storage(backend="redis", endpoints=["redis://127.0.0.1:6379", "redis://10.0.0.2:6379/3"]),
    storage(backend="redis", endpoints=["rediss://cache.example:6380/0"]),
    storage(backend="redis", endpoints=["unix:///run/redis/redis.sock"], password="pw"),
    storage(backend="redis", endpoints=["redis://:s3cret@127.0.0.1:6379/0"]),
    storage(backend="etcd3", endpoints=["http://root:s3cret@127.0.0.1:2379"], username="root"),
]


@pytest.mark.parametrize("data", VALID_STORES, ids=[str(item["storage"]) for item in VALID_STORES])
def test_storage_valid_combinations(data):
    config = parse_config(data, env={}, source="test")

    assert config.storage.backend == data["storage"].get("backend", "embedded")
    assert config.storage.endpoints == tuple(data["storage"].get("endpoints", ()))


def test_storage_embedded_path_follows_state_dir():
    config = parse_config({"node": {"state_dir": "/srv/fk"}}, env={}, source="test")

    assert config.storage.path == "/srv/fk/store.db"
    assert config.redacted()["storage"]["path"] == "/srv/fk/store.db"


def test_storage_embedded_explicit_path_kept():
    config = parse_config(storage(path="/data/store.db"), env={}, source="test")

    assert config.storage.path == "/data/store.db"


def test_storage_path_not_derived_for_networked_backend():
    config = parse_config(storage(backend="etcd3", endpoints=["http://127.0.0.1:2379"]), env={}, source="test")

    assert config.storage.path == ""


def test_storage_bad_state_dir_reports_only_state_dir():
    problems = problems_of({"node": {"state_dir": "relative"}})

    assert len(problems) == 1 and problems[0].startswith('node.state_dir = "relative"'), problems


STORAGE_ERRORS = [
    (storage(endpoints=["http://127.0.0.1:2379"]),
     ['storage.endpoints = ["http://127.0.0.1:2379"]: storage.backend is not set; set it to the store these '
      'endpoints belong to ("etcd2", "etcd3", "redis"), since the default backend "embedded" takes no endpoints']),
    (storage(endpoints=["127.0.0.1:2379"]),
     ["storage.backend is not set",
      'storage.endpoints[0] = "127.0.0.1:2379": expected a store URL: http:// or https:// (etcd), redis://, '
      'rediss:// or unix:// (redis), for example "http://127.0.0.1:2379"']),
    (storage(backend="embedded", endpoints=["http://127.0.0.1:2379"]),
     ['storage.endpoints = ["http://127.0.0.1:2379"]: the embedded store takes no endpoints; remove '
      "storage.endpoints or choose another backend"]),
    (storage(backend="etcd3"),
     ["storage.endpoints (default) = []: the etcd3 backend needs at least one endpoint; list the store's URLs, "
      'for example endpoints = ["http://127.0.0.1:2379"]']),
    (storage(backend="etcd2", endpoints=[]),
     ["storage.endpoints = []: the etcd2 backend needs at least one endpoint; list the store's URLs, for example "
      'endpoints = ["http://127.0.0.1:2379"]']),
    (storage(backend="redis", endpoints=[]),
     ["storage.endpoints = []: the redis backend needs at least one endpoint; list the store's URLs, for example "
      'endpoints = ["redis://127.0.0.1:6379/0"]']),
    (storage(backend="etcd3", endpoints=["127.0.0.1:2379"]),
     ['storage.endpoints[0] = "127.0.0.1:2379": expected an http:// or https:// URL with host and port for the '
      'etcd3 backend, for example "http://127.0.0.1:2379"']),
    (storage(backend="etcd3", endpoints=["http://127.0.0.1"]),
     ['storage.endpoints[0] = "http://127.0.0.1": the port is missing; write it after the host, for example '
      '"http://127.0.0.1:2379"']),
    (storage(backend="etcd3", endpoints=["http://127.0.0.1:0"]),
     ['storage.endpoints[0] = "http://127.0.0.1:0": port 0 cannot be dialled; write the store\'s port, for '
      'example "http://127.0.0.1:2379"']),
    (storage(backend="etcd3", endpoints=["http://127.0.0.1:2379/v2/keys"]),
     ['storage.endpoints[0] = "http://127.0.0.1:2379/v2/keys": an etcd URL takes no path; write only '
      'scheme://host:port, for example "http://127.0.0.1:2379"']),
    (storage(backend="etcd3", endpoints=["http://127.0.0.1:2379?x=1"]),
     ['storage.endpoints[0] = "http://127.0.0.1:2379?x=1": a store URL takes no ?query or #fragment; write '
      '"http://127.0.0.1:2379"']),
    (storage(backend="etcd3", endpoints=["http://127.0.0.1:99999"]),
     ['storage.endpoints[0] = "http://127.0.0.1:99999": not a valid URL; expected an http:// or https:// URL']),
    (storage(backend="etcd2", endpoints=["redis://127.0.0.1:6379"]),
     ['storage.endpoints[0] = "redis://127.0.0.1:6379": expected an http:// or https:// URL with host and port '
      'for the etcd2 backend, for example "http://127.0.0.1:2379"']),
    (storage(backend="redis", endpoints=["http://127.0.0.1:6379"]),
     ['storage.endpoints[0] = "http://127.0.0.1:6379": expected a redis://host:port[/db], '
      "rediss://host:port[/db] or unix:///absolute/path.sock URL for the redis backend, for example "
      '"redis://127.0.0.1:6379/0"']),
    (storage(backend="redis", endpoints=["redis://127.0.0.1"]),
     ['storage.endpoints[0] = "redis://127.0.0.1": the port is missing; write it after the host, for example '
      '"redis://127.0.0.1:6379"']),
    (storage(backend="redis", endpoints=["redis://127.0.0.1:6379/cache"]),
     ['storage.endpoints[0] = "redis://127.0.0.1:6379/cache": the path is the database number, such as "/0"; '
      'for example "redis://127.0.0.1:6379/0"']),
    (storage(backend="redis", endpoints=["unix://run/redis.sock"]),
     ['storage.endpoints[0] = "unix://run/redis.sock": a unix socket needs an absolute path after "unix://", '
      'for example "unix:///run/redis.sock"']),
    (storage(backend="redis", endpoints=["unix:///" + "s" * 107]),
     ["longer than 107 bytes"]),
    (storage(backend="etcd3", endpoints=["http://root:hunter2@127.0.0.1:2379"], password="hunter3"),
     ['storage.endpoints[0] = "http://root:***@127.0.0.1:2379": the URL has a password and storage.password is '
      "set too; keep only one of them (storage.password keeps it out of the URL)"]),
    (storage(backend="etcd2", endpoints=["https://127.0.0.1:2379"], path="/srv/store.db"),
     ['storage.path = "/srv/store.db": storage.path is the file of the embedded store and the etcd2 backend does '
      'not use it; remove storage.path or set storage.backend = "embedded"']),
    (storage(password="hunter2"),
     ['storage.password = "***": the embedded store is a local file and takes no credentials; remove '
      "storage.password or choose another backend"]),
    (storage(username="fleet"),
     ['storage.username = "fleet": the embedded store is a local file and takes no credentials; remove '
      "storage.username or choose another backend"]),
    (storage(ca_file="/nonexistent/ca.pem"),
     ['storage.ca_file = "/nonexistent/ca.pem": no such file; give the path of an existing PEM file, or "" for '
      "none"]),
]


@pytest.mark.parametrize(("data", "expected"), STORAGE_ERRORS, ids=[item[1][0][:50] for item in STORAGE_ERRORS])
def test_storage_errors(data, expected):
    problems = problems_of(data)

    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected):
        assert fragment in problem
        assert "hunter2" not in problem


def test_storage_every_problem_at_once():
    data = storage(backend="redis", endpoints=["redis://a", "http://b:1", "rediss://c:6380"], path="/x.db",
                   ca_file="/nonexistent.pem", prefix="x")

    problems = problems_of(data)

    joined = "\n".join(problems)
    assert len(problems) == 5, problems
    for fragment in ("storage.ca_file", "storage.prefix", "storage.endpoints[0]", "storage.endpoints[1]",
                     "storage.path"):
        assert fragment in joined


def test_storage_unknown_backend_still_checks_endpoints():
    problems = problems_of(storage(backend="zookeeper", endpoints=["ftp://x:1"]))

    assert len(problems) == 2, problems
    assert problems[0].startswith('storage.backend = "zookeeper": unknown backend')
    assert problems[1].startswith('storage.endpoints[0] = "ftp://x:1": expected a store URL')


def test_storage_env_endpoints_need_backend():
    problems = problems_of({}, env={"FLEETKIT_STORAGE_ENDPOINTS": "http://127.0.0.1:2379"})

    assert problems == ['FLEETKIT_STORAGE_ENDPOINTS: storage.endpoints = "http://127.0.0.1:2379": storage.backend '
                        'is not set; set it to the store these endpoints belong to ("etcd2", "etcd3", "redis"), '
                        'since the default backend "embedded" takes no endpoints']


def test_storage_env_backend_with_file_endpoints():
    config = parse_config(storage(endpoints=["redis://127.0.0.1:6379"]), env={"FLEETKIT_STORAGE_BACKEND": "redis"},
                          source="test")

    assert config.storage.backend == "redis"


def test_storage_env_endpoint_problem_names_variable():
    problems = problems_of({}, env={"FLEETKIT_STORAGE_BACKEND": "redis",
                                    "FLEETKIT_STORAGE_ENDPOINTS": "redis://127.0.0.1:6379,redis://x"})

    assert problems == ['FLEETKIT_STORAGE_ENDPOINTS: storage.endpoints[1] = "redis://x": the port is missing; '
                        'write it after the host, for example "redis://x:6379"']


def test_storage_env_password_overrides_file():
    data = storage(backend="redis", endpoints=["redis://127.0.0.1:6379"], password="from-file")

    config = parse_config(data, env={"FLEETKIT_STORAGE_PASSWORD": "from-env"}, source="test")

    assert config.storage.password == "from-env"
    assert config.redacted()["storage"]["password"] == "***"


def test_storage_env_password_masked_in_problem():
    problems = problems_of({}, env={"FLEETKIT_STORAGE_PASSWORD": "hunter2"})

    assert problems == ['FLEETKIT_STORAGE_PASSWORD: storage.password = "***": the embedded store is a local file '
                        "and takes no credentials; remove storage.password or choose another backend"]


def test_storage_redacted_masks_password_key_and_urls():
    data = storage(backend="redis", endpoints=["redis://:hunter2@127.0.0.1:6379/0", "unix:///run/redis.sock"],
                   username="fleet")
    config = parse_config(data, env={"FLEETKIT_STORAGE_PASSWORD": ""}, source="test")
    with_password = parse_config(storage(backend="redis", endpoints=["redis://127.0.0.1:6379"],
                                         password="hunter2"), env={}, source="test")

    assert config.redacted()["storage"]["endpoints"] == ["redis://:***@127.0.0.1:6379/0", "unix:///run/redis.sock"]
    assert config.redacted()["storage"]["password"] == ""
    assert with_password.redacted()["storage"]["password"] == "***"
    assert with_password.redacted()["storage"]["username"] == ""
    for shown in (repr(config.redacted()), repr(with_password.redacted()), repr(config), repr(with_password)):
        assert "hunter2" not in shown


def test_storage_password_with_slash_masked_whole():
    problems = problems_of(storage(backend="etcd3", endpoints=["http://root:hun/ter2@127.0.0.1:2379"]))

    assert len(problems) == 1
    assert problems[0].startswith('storage.endpoints[0] = "http://root:***@127.0.0.1:2379": not a valid URL; '
                                  'write a "/", "@" or ":" in a user name or password as %2F, %40 or %3A')
    assert "hun" not in problems[0]


def test_storage_tls_files(pem):
    data = storage(backend="etcd2", endpoints=["https://127.0.0.1:2379"], ca_file=pem("ca.pem"),
                   cert_file=pem("client.pem"), key_file=pem("client-key.pem"))

    config = parse_config(data, env={}, source="test")

    assert config.storage.ca_file.endswith("/ca.pem")
    assert config.storage.cert_file.endswith("/client.pem")
    assert config.storage.key_file.endswith("/client-key.pem")


def test_storage_rediss_without_ca_file_uses_system_cas():
    config = parse_config(storage(backend="redis", endpoints=["rediss://127.0.0.1:6380"]), env={}, source="test")

    assert config.storage.ca_file == ""


def test_storage_ca_file_with_http_suggests_https(pem):
    ca = pem("ca.pem")
    data = storage(backend="etcd2", endpoints=["https://10.0.0.1:2379", "http://root:hunter2@10.0.0.2:2379"],
                   ca_file=ca)

    problems = problems_of(data)

    assert problems == ['storage.endpoints[1] = "http://root:***@10.0.0.2:2379": storage.ca_file is set but this '
                        'URL does not use TLS; write "https://root:***@10.0.0.2:2379", or remove storage.ca_file']


def test_storage_client_cert_with_redis_suggests_rediss(pem):
    data = storage(backend="redis", endpoints=["redis://10.0.0.1:6379", "unix:///run/redis.sock"],
                   cert_file=pem("c.pem"), key_file=pem("k.pem"))

    problems = problems_of(data)

    assert problems == [
        'storage.endpoints[0] = "redis://10.0.0.1:6379": storage.cert_file and storage.key_file are set but this '
        'URL does not use TLS; write "rediss://10.0.0.1:6379", or remove storage.cert_file and storage.key_file',
        'storage.endpoints[1] = "unix:///run/redis.sock": a unix socket does not use TLS; remove storage.cert_file '
        "and storage.key_file or use a rediss:// URL",
    ]


@pytest.mark.parametrize(("have", "need"), [("cert_file", "key_file"), ("key_file", "cert_file")])
def test_storage_cert_and_key_go_together(pem, have, need):
    path = pem("x.pem")
    problems = problems_of(storage(backend="etcd2", endpoints=["https://127.0.0.1:2379"], **{have: path}))

    assert problems == [f'storage.{have} = "{path}": storage.{need} is not set; a client certificate needs its '
                        "private key, so set both storage.cert_file and storage.key_file, or neither"]


def test_storage_tls_file_is_directory(tmp_path):
    problems = problems_of(storage(backend="etcd2", endpoints=["https://127.0.0.1:2379"], ca_file=str(tmp_path)))

    assert problems == [f'storage.ca_file = "{tmp_path}": is a directory; give the path of a PEM file, or "" for '
                        "none"]


def test_storage_missing_key_file_named(pem):
    cert = pem("c.pem")
    problems = problems_of(storage(backend="etcd2", endpoints=["https://127.0.0.1:2379"], cert_file=cert,
                                   key_file="/nonexistent/k.pem"))

    # Only the missing file: the pairing rule skips a key that failed its own check.
    assert problems == ['storage.key_file = "/nonexistent/k.pem": no such file; give the path of an existing PEM '
                        'file, or "" for none']


def test_storage_embedded_rejects_tls(pem):
    ca = pem("ca.pem")

    problems = problems_of(storage(ca_file=ca))

    assert problems == [f'storage.ca_file = "{ca}": the embedded store is a local file and takes no TLS settings; '
                        "remove storage.ca_file or choose another backend"]


def test_storage_plugin_backend_gets_no_url_rules():
    config = parse_config(storage(backend="consul", endpoints=["consul://x"]), env={}, source="test",
                          choices={"storage.backend": {"consul"}})

    assert config.storage.endpoints == ("consul://x",)


def test_storage_config_repr_hides_passwords():
    config = config_module.StorageConfig(backend="etcd3", endpoints=("http://u:hunter2@h:2379",), password="hunter2")

    assert "hunter2" not in repr(config)
    assert "u:***@h:2379" in repr(config)


# ---------------------------------------------------------------- environment


def test_env_overrides_each_kind():
    env = {
        "FLEETKIT_NODE_NAME": "db-2",
        "FLEETKIT_STORAGE_BACKEND": "etcd3",
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
    problems = problems_of({}, env={"FLEETKIT_STORAGE_BACKEND": "etcd3", "FLEETKIT_STORAGE_ENDPOINTS": ""})

    assert problems == ['FLEETKIT_STORAGE_ENDPOINTS: storage.endpoints = "": the etcd3 backend needs at least one '
                        'endpoint; list the store\'s URLs, for example endpoints = ["http://127.0.0.1:2379"]']


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
    data = {"storage": {"backend": "etcd2", "endpoints": ["https://root:hunter2@127.0.0.1:2379"]}}
    config = parse_config(data, env={}, source="test")

    display = config.redacted()

    assert display["storage"]["endpoints"] == ["https://root:***@127.0.0.1:2379"]
    assert display["engine"]["lease_ttl"] == "10s"
    assert display["source"] == "test"
    assert "hunter2" not in repr(display)


# ---------------------------------------------------------------- check_config


@pytest.fixture(scope="module")
def tls_env(tmp_path_factory):
    """Environment that gives [tls] a CA, a node certificate and its key, so listeners need no insecure = true."""
    directory = tmp_path_factory.mktemp("tls")
    init_ca(directory)
    cert, key = issue(directory, directory, name="node-1", role="node", ips=["127.0.0.1"], dns=[])
    return {"FLEETKIT_TLS_CA": str(directory / "ca.pem"), "FLEETKIT_TLS_CERT": str(cert), "FLEETKIT_TLS_KEY": str(key),
            "FLEETKIT_NODE_NAME": "node-1"}


def test_check_config_warns_short_lease(tmp_path, tls_env):
    path = write(tmp_path, '[engine]\nlease_ttl = "6s"\nreconcile_interval = "5s"\n')

    _, warnings = check_config(path, env=tls_env)

    assert any(warning.startswith("engine.lease_ttl (6s) is less than twice") for warning in warnings)


def test_check_config_defaults_have_no_warnings(tls_env):
    _, warnings = check_config(None, env=tls_env)

    assert warnings == []


def test_check_config_warns_unresolvable_unit_directory(tmp_path, tls_env):
    path = write(tmp_path, '[runtime]\nbus = "user"\n')

    _, warnings = check_config(path, env=tls_env)

    assert any("XDG_RUNTIME_DIR" in warning for warning in warnings)


def test_check_config_warns_local_listen_remote_store(tmp_path, tls_env):
    path = write(tmp_path, '[storage]\nbackend = "etcd3"\nendpoints = ["http://192.0.2.1:2379"]\n')

    _, warnings = check_config(path, env=tls_env)

    assert any(warning.startswith('transport.listen = "127.0.0.1:7070" accepts only local') for warning in warnings)


@pytest.mark.parametrize(("text", "warned"), [
    ('backend = "etcd3"\nendpoints = ["http://192.0.2.1:2379"]\npassword = "pw"', "http://192.0.2.1:2379"),
    ('backend = "etcd3"\nendpoints = ["http://root:hunter2@192.0.2.1:2379"]', "http://root:***@192.0.2.1:2379"),
    ('backend = "redis"\nendpoints = ["redis://cache.example:6379"]\npassword = "pw"', "redis://cache.example:6379"),
])
def test_check_config_warns_plaintext_password(tmp_path, tls_env, text, warned):
    path = write(tmp_path, f"[storage]\n{text}\n[transport]\nlisten = \"0.0.0.0:7070\"\n")

    _, warnings = check_config(path, env=tls_env)

    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f'storage.endpoints[0] = "{warned}" is not encrypted and the store is on another '
                                  "machine, so the store password travels in plaintext; use ")
    assert "hunter2" not in warnings[0]


@pytest.mark.parametrize("text", [
    'backend = "etcd3"\nendpoints = ["http://192.0.2.1:2379"]',
    'backend = "etcd3"\nendpoints = ["http://127.0.0.1:2379"]\npassword = "pw"',
    'backend = "etcd2"\nendpoints = ["https://192.0.2.1:2379"]\npassword = "pw"',
    'backend = "redis"\nendpoints = ["rediss://192.0.2.1:6379"]\npassword = "pw"',
    'backend = "redis"\nendpoints = ["unix:///run/redis.sock"]\npassword = "pw"',
    'backend = "redis"\nendpoints = ["redis://localhost:6379"]\npassword = "pw"',
])
def test_check_config_no_plaintext_warning(tmp_path, tls_env, text):
    path = write(tmp_path, f"[storage]\n{text}\n[transport]\nlisten = \"0.0.0.0:7070\"\n")

    _, warnings = check_config(path, env=tls_env)

    assert warnings == []


def test_check_config_unix_store_is_local(tmp_path, tls_env):
    path = write(tmp_path, '[storage]\nbackend = "redis"\nendpoints = ["unix:///run/redis.sock"]\n')

    _, warnings = check_config(path, env=tls_env)

    assert warnings == []


def test_check_config_raises_on_invalid(tmp_path):
    with pytest.raises(ConfigError):
        check_config(write(tmp_path, '[engine]\nlease_ttl = "1"\n'), env={})


def test_daemon_config_refuses_a_tcp_listener_without_tls(tmp_path):
    path = write(tmp_path, '[api]\nlisten = "127.0.0.1:7071"\n')

    with pytest.raises(ConfigError) as caught:
        check_config(path, env={})

    assert caught.value.problems == [
        'transport.listen (default) = "127.0.0.1:7070": this TCP listener has no TLS; set tls.ca, tls.cert and '
        "tls.key (fleetkit tls init-ca and fleetkit tls issue make them; see docs/security.md), or set "
        "transport.insecure = true to accept plaintext connections from anyone who can reach the port",
        'api.listen = "127.0.0.1:7071": this TCP listener has no TLS; set tls.ca, tls.cert and tls.key (fleetkit '
        "tls init-ca and fleetkit tls issue make them; see docs/security.md), or set api.insecure = true to "
        "accept plaintext connections from anyone who can reach the port",
    ]


def test_insecure_listener_starts_with_a_warning(tmp_path):
    path = write(tmp_path, "[transport]\ninsecure = true\n")

    config, warnings = check_config(path, env={})

    assert config.transport.insecure
    assert warnings == ['transport.insecure = true: transport.listen = "127.0.0.1:7070" accepts plaintext '
                        "connections without certificates; anyone who can reach the port can act as an agent"]


def test_listener_tls_needs_all_three_files(tmp_path, tls_env):
    env = {"FLEETKIT_TLS_CERT": tls_env["FLEETKIT_TLS_CERT"]}

    with pytest.raises(ConfigError) as caught:
        check_config(write(tmp_path, ""), env=env)

    assert caught.value.problems == [
        'transport.listen (default) = "127.0.0.1:7070": TLS needs a CA, a certificate and a key, but tls.ca and '
        "tls.key are not set; set tls.ca and tls.key (or transport.tls_ca and transport.tls_key for this listener "
        "only)",
    ]


def test_listener_override_completes_tls(tmp_path, tls_env):
    text = (f'[transport]\ntls_ca = "{tls_env["FLEETKIT_TLS_CA"]}"\ntls_cert = "{tls_env["FLEETKIT_TLS_CERT"]}"\n'
            f'tls_key = "{tls_env["FLEETKIT_TLS_KEY"]}"\n')

    config, warnings = check_config(write(tmp_path, text), env={"FLEETKIT_NODE_NAME": "node-1"})

    assert config_module.listener_tls_files(config.tls, config.transport) == {
        "ca": tls_env["FLEETKIT_TLS_CA"], "cert": tls_env["FLEETKIT_TLS_CERT"], "key": tls_env["FLEETKIT_TLS_KEY"],
    }
    assert warnings == []


def test_listener_check_only_for_daemon():
    assert parse_config({}, env={}).transport.insecure is False
    with pytest.raises(ConfigError):
        parse_config({}, env={}, for_daemon=True)
    parse_config({"transport": {"insecure": True}}, env={}, for_daemon=True)


def test_etcd3_endpoints_mixing_schemes_are_rejected():
    with pytest.raises(ConfigError) as caught:
        parse_config({"storage": {"backend": "etcd3", "endpoints": ["https://10.0.0.1:2379", "http://10.0.0.2:2379"]}},
                     env={})

    assert caught.value.problems == [
        'storage.endpoints = ["https://10.0.0.1:2379", "http://10.0.0.2:2379"]: the endpoints mix http:// and '
        "https://; the etcd3 backend talks to every endpoint the same way, so use https:// for all of them (or "
        "http:// on a trusted network)",
    ]


def test_socket_group_needs_group_and_socket():
    with pytest.raises(ConfigError) as caught:
        parse_config({"api": {"socket_group": "no-such-group-here", "listen": "127.0.0.1:7071"}}, env={})

    assert caught.value.problems == [
        'api.socket_group = "no-such-group-here": no such group on this machine; create it (groupadd '
        'no-such-group-here) or give an existing group, or "" for the owner only',
    ]
    with pytest.raises(ConfigError) as caught:
        parse_config({"api": {"socket_group": "root", "listen": "127.0.0.1:7071"}}, env={})
    assert caught.value.problems == [
        'api.socket_group = "root": api.socket_group sets the group of a unix socket, but api.listen = '
        '"127.0.0.1:7071" is a TCP address; remove api.socket_group',
    ]


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


def test_docs_examples_are_valid():
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    examples = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)

    assert len(examples) >= 5  # one per backend and the full example
    for example in examples:
        try:
            parse_config(tomllib.loads(example), env={}, source="docs/config.md")
        except ConfigError as error:
            # The examples name certificate files of another machine; everything else must be valid.
            other = [problem for problem in error.problems if "no such file" not in problem]
            assert other == [], example


def test_example_file_is_valid():
    config = load_config(REPO / "examples" / "cluster.toml", env={})

    assert config.source.endswith("cluster.toml")
