"""The daemon configuration: cluster.toml, environment overrides and validation.

`load_config` reads a TOML file, applies ``FLEETKIT_<SECTION>_<KEY>``
environment variables on top and validates the result as a whole: it raises a
single `ConfigError` that lists every problem, so an operator fixes them all in
one pass. `SCHEMA` describes every key by kind, check, default and doc.
Validation, environment overrides and `Config.redacted` read that table, so a
new section is a table entry plus a dataclass.

`KeySpec`, `SectionSpec`, the reading of raw values and most checks of single
keys are in `fleetkit.core.config_schema`. The parsing and checks of host:port
and unix socket addresses are in `fleetkit.core.addresses`. This module
re-exports the public names of both, so callers import everything from here.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from fleetkit.core.addresses import (
    ANY_STORE_URL, STORE_URLS, TLS_SCHEMES, _check_advertise, _check_api_listen, _check_listen, _is_loopback,
    _is_unspecified, _join_host_port, _split_host_port, endpoint_address, store_host, store_url_problem,
)
from fleetkit.core.config_schema import (  # noqa: F401 (KINDS is re-exported)
    _WHOLE, KINDS, KeySpec, SectionSpec, _as_default, _at_least, _check_absolute_path, _check_bus,
    _check_endpoints, _check_existing_file, _check_metadata, _check_node_name, _check_optional_path, _check_prefix,
    _check_public_ip, _display, _fail, _from_env, _from_toml, _Invalid, _mask_url, _section, _show, _toml_key,
    _validate_key,
)
from fleetkit.core.durations import DurationError, format_duration
from fleetkit.core.errors import ConfigError

__all__ = [
    "KNOWN_RUNTIME_BACKENDS", "KNOWN_STORAGE_BACKENDS", "KNOWN_TRANSPORT_MODES", "SCHEMA",
    "AgentConfig", "ApiConfig", "Config", "EngineConfig", "KeySpec", "LogConfig", "NodeConfig",
    "RuntimeConfig", "SectionSpec", "StorageConfig", "TlsConfig", "TransportConfig", "check_config",
    "default_node_name", "endpoint_address", "listener_tls_files", "load_config", "parse_config",
]

# Backend names accepted by validation. Modules that register more backends add
# their names to these sets, and parse_config also takes an explicit set per key.
KNOWN_STORAGE_BACKENDS: set[str] = {"etcd3", "etcd2", "redis", "embedded"}
KNOWN_TRANSPORT_MODES: set[str] = {"grpc", "etcd-watch", "hybrid"}
KNOWN_RUNTIME_BACKENDS: set[str] = {"systemd", "simulated"}

MACHINE_ID_PATH = "/etc/machine-id"
ENV_PREFIX = "FLEETKIT_"
# FLEETKIT_* variables that belong to the command-line client, not to the daemon config.
ENV_IGNORED = frozenset({"FLEETKIT_ENDPOINT", "FLEETKIT_CA_FILE", "FLEETKIT_CERT_FILE", "FLEETKIT_KEY_FILE",
                         "FLEETKIT_INSECURE"})

_SYSTEM_BUS_SOCKETS = ("/run/dbus/system_bus_socket", "/var/run/dbus/system_bus_socket")


def default_node_name(machine_id_path: str | None = None) -> str:
    """Return the machine id (from MACHINE_ID_PATH by default), or the host name if it is unreadable or empty."""
    try:
        with open(machine_id_path or MACHINE_ID_PATH, encoding="ascii") as handle:
            machine_id = handle.read().strip()
    except (OSError, UnicodeDecodeError):
        machine_id = ""
    return machine_id or socket.gethostname()


@dataclass(frozen=True)
class NodeConfig:
    """Identity of this machine in the cluster."""

    name: str = field(default_factory=default_node_name)
    metadata: dict[str, str] = field(default_factory=dict)
    public_ip: str = ""
    state_dir: str = "/var/lib/fleetkit"


@dataclass(frozen=True)
class StorageConfig:
    """Store that contains the cluster state. Durations are in seconds.

    The default backend, "embedded", keeps the state in the file `path` on this
    machine and takes no endpoints; the others are shared stores reached at
    `endpoints`. A Config built by `parse_config` with the embedded backend
    always has `path` set (to `<node.state_dir>/store.db` unless given).
    """

    backend: str = "embedded"
    endpoints: tuple[str, ...] = ()
    username: str = ""
    password: str = field(default="", repr=False)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    path: str = ""
    prefix: str = "/fleetkit/"
    dial_timeout: float = 5.0
    request_timeout: float = 5.0

    def __repr__(self) -> str:
        # Like the generated repr, with URL passwords masked and the password key left out.
        shown = (f"{item.name}={_masked(getattr(self, item.name))!r}" for item in dataclasses.fields(self)
                 if item.repr)
        return f"{type(self).__name__}({', '.join(shown)})"


def _masked(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_mask_url(item) for item in value)
    return _mask_url(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class TransportConfig:
    """Engine–agent transport."""

    mode: str = "grpc"
    listen: str = "127.0.0.1:7070"
    advertise: str = ""
    fallback_after: float = 10.0
    insecure: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def advertise_address(self, public_ip: str, bound_port: int | None = None) -> str:
        """Return the host:port that other machines use to reach this transport.

        `advertise` wins when set. Otherwise the listen address is used, with its
        host replaced by `public_ip` when it is 0.0.0.0 or ::, and its port by
        `bound_port` (the port the server actually bound) when given.
        Raises ConfigError when no reachable address can be derived.
        """
        if self.advertise:
            return self.advertise
        host, port = _split_host_port(self.listen)
        if bound_port is not None:
            port = bound_port
        if port == 0:
            raise ConfigError([f'transport.listen = "{self.listen}": port 0 cannot be advertised; '
                               "pass the bound port or set transport.advertise"])
        if _is_unspecified(host):
            try:
                host = str(ipaddress.ip_address(public_ip))
            except ValueError:
                problem = (f'transport.listen = "{self.listen}" listens on all addresses and the public IP '
                           f"{public_ip!r} is not an IP address; set node.public_ip or transport.advertise")
                raise ConfigError([problem]) from None
        return _join_host_port(host, port)


@dataclass(frozen=True)
class EngineConfig:
    """Engine leader election and scheduling passes. Durations are in seconds."""

    enabled: bool = True
    lease_ttl: float = 10.0
    reconcile_interval: float = 5.0


@dataclass(frozen=True)
class AgentConfig:
    """Per-machine agent. `ttl` is in seconds."""

    ttl: float = 30.0


@dataclass(frozen=True)
class RuntimeConfig:
    """Local service manager connection."""

    backend: str = "systemd"
    bus: str = "system"
    unit_directory: str = ""

    def resolved_unit_directory(self, env: Mapping[str, str] | None = None) -> str:
        """Return the directory where the agent writes unit files.

        An explicit `unit_directory` wins. Otherwise it follows the bus: the
        system bus gives /run/systemd/system, the user bus
        $XDG_RUNTIME_DIR/systemd/user, and a D-Bus address unix:path=DIR/bus
        gives DIR/systemd/user. Raises ConfigError when it cannot be derived.
        """
        if self.unit_directory:
            return self.unit_directory
        environ = os.environ if env is None else env
        directory, problem = _derive_unit_directory(self.bus, environ)
        if problem:
            raise ConfigError([problem])
        return directory


@dataclass(frozen=True)
class ApiConfig:
    """Control API served to the command-line client."""

    listen: str = "unix:///run/fleetkit/fleetkit.sock"
    socket_group: str = ""
    insecure: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""


@dataclass(frozen=True)
class TlsConfig:
    """Certificates of the gRPC listeners and their clients. Durations are in seconds.

    `ca`, `cert` and `key` apply to every listener and client unless the
    listener's section overrides them with `tls_ca`, `tls_cert` or `tls_key`.
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    expiry_warning: float = 30 * 86400.0
    reload_interval: float = 10.0
    check_peer_address: bool = True
    check_machine_name: bool = True


@dataclass(frozen=True)
class LogConfig:
    """Daemon logging."""

    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    """Whole validated daemon configuration. `source` is the file path or "<defaults>"."""

    node: NodeConfig = field(default_factory=NodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "<defaults>"

    def redacted(self) -> dict[str, Any]:
        """Return the configuration as plain data for display.

        Durations are written as strings ("10s"), passwords in URLs are
        replaced by "***", and keys marked secret in SCHEMA are masked whole.
        """
        result: dict[str, Any] = {}
        for section in SCHEMA.values():
            values = getattr(self, section.name, None)
            if values is None:
                continue
            result[section.name] = {spec.name: _display(spec, getattr(values, spec.name)) for spec in section.keys}
        result["source"] = self.source
        return result


# ---------------------------------------------------------------- schema

def _node_section() -> SectionSpec:
    return _section(
        "node", NodeConfig,
        KeySpec("name", "string", "Unique name of this machine in the cluster.", _check_node_name),
        KeySpec("metadata", "table", "Labels that units can require, as string keys and values.", _check_metadata),
        KeySpec("public_ip", "string", 'Address other machines use to reach this one; "" detects it.',
                _check_public_ip),
        KeySpec("state_dir", "string", "Directory for local daemon state.", _check_absolute_path),
    )


def _listener_keys(section: str, what: str) -> tuple[KeySpec, ...]:
    return (
        KeySpec("insecure", "boolean", f"Accept plaintext connections to {what}, without certificates; a "
                "warning is logged at every start."),
        KeySpec("tls_ca", "string", f'CA file for {what}; "" uses tls.ca.', _check_existing_file),
        KeySpec("tls_cert", "string", f'Certificate file for {what}; "" uses tls.cert.', _check_existing_file),
        KeySpec("tls_key", "string", f'Key file for {what}; "" uses tls.key.', _check_existing_file),
    )


def _check_group(value: str) -> str:
    if not value:
        return value
    try:
        grp.getgrnam(value)
    except KeyError:
        _fail(f'no such group on this machine; create it (groupadd {value}) or give an existing group, or "" for '
              "the owner only")
    return value


SCHEMA: dict[str, SectionSpec] = {section.name: section for section in (
    _node_section(),
    _section(
        "storage", StorageConfig,
        KeySpec("backend", "string", "Storage backend name.", choices=KNOWN_STORAGE_BACKENDS),
        KeySpec("endpoints", "list", "Store URLs: http(s)://host:port for etcd, redis(s)://host:port[/db] or "
                "unix:///path.sock for redis, none for the embedded store.", _check_endpoints),
        KeySpec("username", "string", "User name to authenticate to the store."),
        KeySpec("password", "string", "Password to authenticate to the store.", secret=True),
        KeySpec("ca_file", "string", 'PEM file of the CAs that sign the store\'s certificate; "" uses the system '
                "CAs.", _check_existing_file),
        KeySpec("cert_file", "string", "PEM client certificate for the store; needs key_file.", _check_existing_file),
        KeySpec("key_file", "string", "PEM private key of cert_file.", _check_existing_file),
        KeySpec("path", "string", 'File of the embedded store; "" means <node.state_dir>/store.db.',
                _check_optional_path),
        KeySpec("prefix", "string", "Key prefix for all fleetkit keys; starts and ends with /.", _check_prefix),
        KeySpec("dial_timeout", "duration", "Time allowed to connect to the store.", _at_least(0)),
        KeySpec("request_timeout", "duration", "Time allowed for one store request.", _at_least(0)),
    ),
    _section(
        "transport", TransportConfig,
        KeySpec("mode", "string", "Engine-agent transport name.", choices=KNOWN_TRANSPORT_MODES),
        KeySpec("listen", "string", "host:port the transport server binds; port 0 picks a free port.",
                _check_listen),
        KeySpec("advertise", "string", 'host:port other machines dial; "" derives it from listen.',
                _check_advertise),
        KeySpec("fallback_after", "duration",
                "With mode hybrid: how long gRPC to the leader may fail before the agent uses storage.",
                _at_least(0.5)),
        *_listener_keys("transport", "the engine-agent transport"),
    ),
    _section(
        "engine", EngineConfig,
        KeySpec("enabled", "boolean", "Whether this daemon runs for engine leadership."),
        KeySpec("lease_ttl", "duration", "Lifetime of the engine leadership lease.", _at_least(2.0)),
        KeySpec("reconcile_interval", "duration", "Time between two scheduling passes.", _at_least(0)),
    ),
    _section(
        "agent", AgentConfig,
        KeySpec("ttl", "duration", "Lifetime of this machine's registration in the store.", _at_least(2.0)),
    ),
    _section(
        "runtime", RuntimeConfig,
        KeySpec("backend", "string", "Local service manager backend.", choices=KNOWN_RUNTIME_BACKENDS),
        KeySpec("bus", "string", '"system", "user" or a D-Bus address.', _check_bus),
        KeySpec("unit_directory", "string", 'Where unit files are written; "" derives it from bus.',
                _check_optional_path),
    ),
    _section(
        "api", ApiConfig,
        KeySpec("listen", "string", "Control API address: unix:///absolute/path or host:port.", _check_api_listen),
        KeySpec("socket_group", "string", 'Group that may use the unix socket besides its owner; "" allows the '
                "owner only.", _check_group),
        *_listener_keys("api", "the control API on TCP"),
    ),
    _section(
        "tls", TlsConfig,
        KeySpec("ca", "string", "PEM file of the cluster CA that signs every peer's certificate.",
                _check_existing_file),
        KeySpec("cert", "string", "PEM certificate of this node, issued by the cluster CA with role node.",
                _check_existing_file),
        KeySpec("key", "string", "PEM private key of cert.", _check_existing_file),
        KeySpec("expiry_warning", "duration", "Warn this long before a certificate expires.", _at_least(0)),
        KeySpec("reload_interval", "duration", "How often the certificate files are checked for changes.",
                _at_least(1.0)),
        KeySpec("check_peer_address", "boolean", "Whether a node certificate must name, as an IP address SAN, "
                "the address its connection comes from."),
        KeySpec("check_machine_name", "boolean", "Whether an agent may only connect as the machine its node "
                "certificate's name (CN) gives, and a daemon's own certificate must be named node.name."),
    ),
    _section(
        "log", LogConfig,
        KeySpec("level", "string", "Lowest level logged.", choices=("debug", "info", "warning", "error")),
        KeySpec("format", "string", "Log line format.", choices=("text", "json")),
    ),
)}


# ---------------------------------------------------------------- loading

def load_config(path: str | os.PathLike[str] | None, *, env: Mapping[str, str] | None = None,
                choices: Mapping[str, Collection[str]] | None = None, for_daemon: bool = False) -> Config:
    """Read, override and validate a config file. `path=None` uses the defaults.

    `env` defaults to os.environ. `choices` replaces the allowed names of a
    key, by dotted key ("storage.backend"). `for_daemon` adds the checks of
    a daemon that will serve: every TCP listener needs TLS or an explicit
    ``insecure = true``. Raises ConfigError listing every problem, including
    a missing file and TOML syntax errors with their line.
    """
    if path is None:
        return parse_config({}, env=env, source="<defaults>", choices=choices, for_daemon=for_daemon)
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"config file {source} not found; create it (examples/cluster.toml is a "
                           "commented example) or pass the path of an existing file"]) from None
    except OSError as error:
        raise ConfigError([f"cannot read config file {source}: {error.strerror or error}"]) from error
    except UnicodeDecodeError as error:
        raise ConfigError([f"{source}: invalid TOML: the file is not UTF-8 text ({error.reason} at byte "
                           f"{error.start}); save it as UTF-8"]) from error
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        found = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if found:
            message = message[:found.start()].rstrip()
            where = f"{source}, line {found.group(1)}, column {found.group(2)}"
        else:
            where = source
        raise ConfigError([f"{where}: invalid TOML: {message}"]) from error
    return parse_config(data, env=env, source=source, choices=choices, for_daemon=for_daemon)


def parse_config(data: Mapping[str, Any], *, env: Mapping[str, str] | None = None, source: str = "<defaults>",
                 choices: Mapping[str, Collection[str]] | None = None, for_daemon: bool = False) -> Config:
    """Validate parsed TOML `data` with environment overrides and build a Config.

    Every key is read from its environment variable if set, else from `data`,
    else from its default, and then checked; `for_daemon` is as in
    `load_config`. Raises ConfigError listing every problem found; nothing is
    built until all of them pass.
    """
    environ = os.environ if env is None else env
    choices = choices or {}
    problems: list[str] = []
    file_values = _read_file_values(data, problems)
    env_values = _read_env_values(environ, problems)

    built: dict[str, Any] = {}
    sources: dict[str, _Source] = {}
    for section in SCHEMA.values():
        values: dict[str, Any] = {}
        for spec in section.keys:
            dotted = f"{section.name}.{spec.name}"
            variable = env_values.get(dotted)
            if variable is not None:
                origin = _Source(f"{variable}: {dotted}", environ[variable], True, spec.secret)
                read = _from_env
            elif dotted in file_values:
                origin, read = _Source(dotted, file_values[dotted], True, spec.secret), _from_toml
            else:
                origin = _Source(f"{dotted} (default)", spec.default_value(), False, spec.secret)
                read = _as_default
            sources[dotted] = origin
            try:
                allowed = choices.get(dotted, spec.choices)
                values[spec.name] = _validate_key(spec, origin.raw, read, allowed)
            except DurationError as error:
                problems.append(f"{origin.where()}: {error}")
            except _Invalid as error:
                advice = f"; set {dotted} explicitly" if read is _as_default else ""
                for subscript, item, message in error.findings:
                    problems.append(f"{origin.where(subscript, item)}: {message}{advice}")
        built[section.name] = values

    _check_across_sections(built, sources, problems)
    if for_daemon:
        _check_listeners(built, sources, problems)
    if problems:
        raise ConfigError(problems)
    # NOTE: Config has one field per built-in section; a section added to
    # SCHEMA without a matching Config field is validated but not kept.
    known = {item.name for item in dataclasses.fields(Config)}
    sections = {name: SCHEMA[name].factory(**values) for name, values in built.items() if name in known}
    return Config(**sections, source=source)


def check_config(path: str | os.PathLike[str] | None, *,
                 env: Mapping[str, str] | None = None) -> tuple[Config, list[str]]:
    """Load a config as the daemon does and return it with warnings about settings that are valid but risky.

    Also loads the listeners' certificates as the daemon will (role, key,
    CA) and warns about those that expire soon. Only reads files and `env`,
    so it binds no port and contacts no server.
    Raises ConfigError like load_config.
    """
    environ = os.environ if env is None else env
    config = load_config(path, env=environ, for_daemon=True)
    warnings = []
    engine = config.engine
    if engine.lease_ttl < 2 * engine.reconcile_interval:
        warnings.append(f"engine.lease_ttl ({format_duration(engine.lease_ttl)}) is less than twice "
                        f"engine.reconcile_interval ({format_duration(engine.reconcile_interval)}); leadership can "
                        "change within fewer than two scheduling passes, so raise lease_ttl or lower "
                        "reconcile_interval")
    if config.storage.request_timeout >= engine.lease_ttl:
        warnings.append(f"storage.request_timeout ({format_duration(config.storage.request_timeout)}) is not "
                        f"less than engine.lease_ttl ({format_duration(engine.lease_ttl)}); one slow store request "
                        "can last longer than the leader lease, so lower request_timeout")
    listen_host, _ = _split_host_port(config.transport.listen)
    hosts = [store_host(url) for url in config.storage.endpoints]
    remote_store = any(host is not None and not _is_loopback(host) for host in hosts)
    if remote_store and _is_loopback(listen_host) and not config.transport.advertise:
        warnings.append(f'transport.listen = "{config.transport.listen}" accepts only local connections but the '
                        "store is on another machine; an engine elsewhere cannot reach this agent, so listen on "
                        "a reachable address or 0.0.0.0")
    for index, (url, host) in enumerate(zip(config.storage.endpoints, hosts)):
        parts = urlsplit(url)
        if parts.scheme in ("http", "redis") and host is not None and not _is_loopback(host) and (
                config.storage.password or parts.password):
            secure = "https" if parts.scheme == "http" else "rediss"
            warnings.append(f"storage.endpoints[{index}] = {_show(url)} is not encrypted and the store is on "
                            f"another machine, so the store password travels in plaintext; use {secure}:// "
                            "(with storage.ca_file if the store's certificate is not signed by a system CA)")
    if config.api.insecure and config.api.listen.startswith("unix://"):
        warnings.append("api.insecure = true has no effect: api.listen is a unix socket, which file permissions "
                        "protect; remove api.insecure")
    for name in ("transport", "api"):
        section = getattr(config, name)
        if section.insecure and not section.listen.startswith("unix://"):
            tls = listener_tls_files(config.tls, section)
            also = " besides TLS connections" if tls["cert"] else ""
            warnings.append(f"{name}.insecure = true: {name}.listen = {_show(section.listen)} accepts plaintext "
                            f"connections without certificates{also}; anyone who can reach the port "
                            f"{'can act as an agent' if name == 'transport' else 'can change units'}")
    from fleetkit.core.credentials import certificate_problems  # imports this module

    problems, expiring = certificate_problems(config)
    if problems:
        raise ConfigError(problems)
    warnings.extend(expiring)
    try:
        config.runtime.resolved_unit_directory(environ)
    except ConfigError as error:
        warnings.extend(f"{problem} (the daemon will fail to start with this environment)"
                        for problem in error.problems)
    return config, warnings


# ---------------------------------------------------------------- helpers

def _read_file_values(data: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    values = {}
    all_keys = [f"{section.name}.{spec.name}" for section in SCHEMA.values() for spec in section.keys]
    for name, table in data.items():
        section = SCHEMA.get(name)
        if section is None:
            close = difflib.get_close_matches(name, [*SCHEMA, *all_keys], n=1)
            hint = f'; did you mean "{close[0]}"?' if close else f"; known sections: {', '.join(SCHEMA)}"
            problems.append(f"{_toml_key(name)}: unknown section{hint}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{name} = {_show(table)}: expected a table; write [{name}] as a section header")
            continue
        for key, value in table.items():
            if section.key(key) is not None:
                values[f"{name}.{key}"] = value
                continue
            dotted = f"{name}.{_toml_key(key)}"
            close = (difflib.get_close_matches(key, [spec.name for spec in section.keys], n=1)
                     or difflib.get_close_matches(dotted, all_keys, n=1))
            if close and "." not in close[0]:
                close[0] = f"{name}.{close[0]}"
            hint = (f'; did you mean "{close[0]}"?' if close
                    else f"; known keys in [{name}]: {', '.join(spec.name for spec in section.keys)}")
            problems.append(f"{dotted}: unknown key{hint}")
    return values


def _read_env_values(env: Mapping[str, str], problems: list[str]) -> dict[str, str]:
    """Map each dotted key to the environment variable that overrides it."""
    variables = {}
    by_length = sorted(SCHEMA.values(), key=lambda section: -len(section.name))
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX) or variable in ENV_IGNORED:
            continue
        rest = variable[len(ENV_PREFIX):]
        section = next((item for item in by_length if rest.startswith(f"{item.name.upper()}_")), None)
        if section is None:
            continue
        key = rest[len(section.name) + 1:].lower()
        if section.key(key) is not None:
            variables[f"{section.name}.{key}"] = variable
            continue
        names = [_env_name(section.name, spec.name) for spec in section.keys]
        close = difflib.get_close_matches(variable, names, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; known variables: {', '.join(names)}"
        problems.append(f"{variable}: unknown setting, [{section.name}] has no key {key!r}{hint}")
    return variables


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


@dataclass(frozen=True)
class _Source:
    """Where the value of one key came from, for messages.

    `label` is the dotted key, prefixed with the environment variable that set
    it or followed by "(default)"; `raw` is the value as written; `given`
    tells whether the file or the environment set it.
    """

    label: str
    raw: Any
    given: bool
    secret: bool = False

    def where(self, subscript: str = "", item: Any = _WHOLE) -> str:
        """Return 'label[subscript] = value' with passwords masked."""
        value = self.raw if item is _WHOLE else item
        shown = _show("***") if self.secret and value != "" else _show(value)
        return f"{self.label}{subscript} = {shown}"


def _check_across_sections(sections: dict[str, dict[str, Any]], sources: Mapping[str, _Source],
                           problems: list[str]) -> None:
    """Append problems that involve several keys, skipping keys that failed their own check.

    Also fills in values derived from other keys, such as storage.path.
    """
    _check_storage(sections["storage"], sections["node"], sources, problems)
    if sections["api"].get("socket_group") and not sections["api"].get("listen", "unix://").startswith("unix://"):
        problems.append(f"{sources['api.socket_group'].where()}: api.socket_group sets the group of a unix "
                        f"socket, but api.listen = {_show(sections['api']['listen'])} is a TCP address; remove "
                        "api.socket_group")
    runtime = sections["runtime"]
    if "bus" not in runtime or "unit_directory" not in runtime:
        return
    if not runtime["unit_directory"] and runtime["bus"] not in ("system", "user"):
        _, problem = _derive_unit_directory(runtime["bus"], {})
        if problem:
            problems.append(problem)


_TLS_PARTS = ("ca", "cert", "key")


def listener_tls_files(tls: Any, section: Any) -> dict[str, str]:
    """Return the ca, cert and key files of one listener: its own tls_* keys, else those of [tls].

    `tls` and `section` are the built dataclasses or the dicts of values being validated.
    """
    def value(owner: Any, key: str) -> str:
        return (owner.get(key) if isinstance(owner, dict) else getattr(owner, key, "")) or ""

    return {part: value(section, f"tls_{part}") or value(tls, part) for part in _TLS_PARTS}


def _check_listeners(sections: dict[str, dict[str, Any]], sources: Mapping[str, _Source],
                     problems: list[str]) -> None:
    """Require TLS or an explicit `insecure = true` on every TCP listener."""
    tls = sections["tls"]
    for name in ("transport", "api"):
        section = sections[name]
        needed = ["listen", "insecure", *(f"tls_{part}" for part in _TLS_PARTS)]
        if any(key not in section for key in needed) or any(part not in tls for part in _TLS_PARTS):
            continue  # a key failed its own check, which is reported already
        listen = section["listen"]
        if listen.startswith("unix://"):
            continue
        files = listener_tls_files(tls, section)
        given = [part for part in _TLS_PARTS if files[part]]
        where = sources[f"{name}.listen"].where()
        if given and len(given) < len(_TLS_PARTS):
            missing = [part for part in _TLS_PARTS if not files[part]]
            names = " and ".join(f"tls.{part}" for part in missing)
            overrides = " and ".join(f"{name}.tls_{part}" for part in missing)
            problems.append(f"{where}: TLS needs a CA, a certificate and a key, but {names} "
                            f"{'is' if len(missing) == 1 else 'are'} not set; set {names} (or "
                            f"{overrides} for this listener only)")
        elif not given and not section["insecure"]:
            problems.append(f"{where}: this TCP listener has no TLS; set tls.ca, tls.cert and tls.key "
                            "(fleetkit tls init-ca and fleetkit tls issue make them; see docs/security.md), or "
                            f"set {name}.insecure = true to accept plaintext connections from anyone who can "
                            "reach the port")


_STORE_CREDENTIALS = ("username", "password")
_STORE_TLS = ("ca_file", "cert_file", "key_file")


def _check_storage(storage: dict[str, Any], node: dict[str, Any], sources: Mapping[str, _Source],
                   problems: list[str]) -> None:
    """Check the [storage] keys against the backend and each other, and derive storage.path."""
    def source(key: str) -> _Source:
        return sources[f"storage.{key}"]

    backend = storage.get("backend")
    endpoints = storage.get("endpoints")
    networked = sorted(STORE_URLS)
    if source("endpoints").given and not source("backend").given:
        names = ", ".join(f'"{name}"' for name in networked)
        problems.append(f"{source('endpoints').where()}: storage.backend is not set; set it to the store these "
                        f'endpoints belong to ({names}), since the default backend "embedded" takes no endpoints')
        backend = None  # what the endpoints are for is unknown: check them against every kind of store URL
    urls = STORE_URLS.get(backend) if backend is not None else ANY_STORE_URL

    if endpoints is not None:
        valid = []
        if backend == "embedded" and endpoints:
            problems.append(f"{source('endpoints').where()}: the embedded store takes no endpoints; remove "
                            "storage.endpoints or choose another backend")
        elif urls is not None and urls is not ANY_STORE_URL and not endpoints:
            problems.append(f"{source('endpoints').where()}: the {backend} backend needs at least one endpoint; "
                            f"list the store's URLs, for example endpoints = [{_show(urls.example)}]")
        elif urls is not None:
            for index, url in enumerate(endpoints):
                problem = store_url_problem(url, urls, backend or "")
                if problem:
                    problems.append(f"{source('endpoints').where(f'[{index}]', url)}: {problem}")
                else:
                    valid.append((index, url))
        _check_store_url_settings(storage, valid, source, problems)

    if backend == "embedded":
        for key in (*_STORE_CREDENTIALS, *_STORE_TLS):
            if storage.get(key):
                problems.append(f"{source(key).where()}: the embedded store is a local file and takes no "
                                f"{'credentials' if key in _STORE_CREDENTIALS else 'TLS settings'}; remove "
                                f"storage.{key} or choose another backend")
        if storage.get("path") == "" and "state_dir" in node:
            storage["path"] = os.path.join(node["state_dir"], "store.db")
    elif backend is not None and storage.get("path"):
        problems.append(f"{source('path').where()}: storage.path is the file of the embedded store and the "
                        f'{backend} backend does not use it; remove storage.path or set storage.backend = '
                        '"embedded"')

    if bool(storage.get("cert_file")) != bool(storage.get("key_file")):
        have, need = ("cert_file", "key_file") if storage.get("cert_file") else ("key_file", "cert_file")
        if need in storage:  # skip when the other key failed its own check
            problems.append(f"{source(have).where()}: storage.{need} is not set; a client certificate needs "
                            "its private key, so set both storage.cert_file and storage.key_file, or neither")


def _check_store_url_settings(storage: dict[str, Any], endpoints: list[tuple[int, str]],
                              source: Callable[[str], _Source], problems: list[str]) -> None:
    """Check the valid store URLs (index, url) against the password and TLS keys."""
    tls_keys = [f"storage.{key}" for key in _STORE_TLS if storage.get(key)]
    schemes = {urlsplit(url).scheme for _index, url in endpoints}
    if storage.get("backend") == "etcd3" and schemes == {"http", "https"} and not tls_keys:
        problems.append(f"{source('endpoints').where()}: the endpoints mix http:// and https://; the etcd3 backend "
                        "talks to every endpoint the same way, so use https:// for all of them (or http:// on a "
                        "trusted network)")
    for index, url in endpoints:
        parts = urlsplit(url)
        where = source("endpoints").where(f"[{index}]", url)
        if parts.password is not None and storage.get("password"):
            problems.append(f"{where}: the URL has a password and storage.password is set too; keep only one "
                            "of them (storage.password keeps it out of the URL)")
        if tls_keys and parts.scheme not in TLS_SCHEMES:
            settings = " and ".join(tls_keys)
            if parts.scheme == "unix":
                fix = f"a unix socket does not use TLS; remove {settings} or use a rediss:// URL"
            else:
                secure = "https" if parts.scheme == "http" else "rediss"
                fix = (f"{settings} {'is' if len(tls_keys) == 1 else 'are'} set but this URL does not use "
                       f"TLS; write {_show(f'{secure}://' + url.split('://', 1)[1])}, or remove {settings}")
            problems.append(f"{where}: {fix}")


def _derive_unit_directory(bus: str, env: Mapping[str, str]) -> tuple[str, str]:
    """Return (directory, "") or ("", problem) for the unit directory that follows from `bus`."""
    if bus == "system":
        return "/run/systemd/system", ""
    if bus == "user":
        runtime_dir = env.get("XDG_RUNTIME_DIR", "")
        if not runtime_dir.startswith("/"):
            return "", ('runtime.bus = "user" needs XDG_RUNTIME_DIR set to an absolute path to find the unit '
                        "directory; set XDG_RUNTIME_DIR or runtime.unit_directory")
        return f"{runtime_dir.rstrip('/')}/systemd/user", ""
    for address in bus.split(";"):
        transport, _, rest = address.partition(":")
        parts = dict(item.partition("=")[::2] for item in rest.split(","))
        path = unquote(parts.get("path", ""))
        if transport != "unix" or not path.startswith("/"):
            continue
        if path in _SYSTEM_BUS_SOCKETS:
            return "/run/systemd/system", ""
        if os.path.basename(path) == "bus":
            return f"{os.path.dirname(path)}/systemd/user", ""
    return "", (f"runtime.bus = {_show(bus)}: cannot derive the unit directory from this address (only "
                "unix:path=DIR/bus and the system bus socket are known); set runtime.unit_directory")
