"""HTTP side of the etcd v2 storage backend: endpoints, TLS, requests and error responses.

`parse_endpoint` splits one entry of ``[storage] endpoints``, such as
``https://user:password@10.0.0.1:2379``, into a base URL without credentials
and the credentials themselves. `Endpoint.url` masks the password, so it is
safe to log and to put into messages.

`V2Client` owns one aiohttp session and sends each request to the endpoint
that responded last. When connecting to it fails, the request goes to the next
endpoint in order, which is safe because nothing was sent. When a request
fails after it was sent (a timeout, a dropped connection), the client moves to
the next endpoint for later requests and raises `StorageUnavailable`, because
the request may or may not have been applied.

Error responses of etcd are translated here, once: unreachable endpoints and
raft trouble become `StorageUnavailable`, rejected credentials become
`StorageError`, and every other error response becomes `Etcd2Error`, which
carries etcd's error code so that the backend can map "compare failed" and
"key not found" to the results of the storage contract.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import yarl

from fleetkit.core.errors import ConfigError, StorageError, StorageUnavailable

log = logging.getLogger(__name__)

DEFAULT_PORT = 2379

# etcd v2 error codes (etcd's error package, shared by every 2.x and 3.x server).
KEY_NOT_FOUND = 100
COMPARE_FAILED = 101
NOT_A_FILE = 102
NODE_EXISTS = 105
UNAUTHORIZED = 110
RAFT_INTERNAL = 300
LEADER_ELECTION = 301
EVENT_INDEX_CLEARED = 401
_UNAVAILABLE_CODES = {RAFT_INTERNAL, LEADER_ELECTION}


class Etcd2Error(StorageError):
    """Error response to a v2 request; `code` is etcd's errorCode, `index` its store index."""

    def __init__(self, message: str, *, code: int, index: int, cause: str = ""):
        super().__init__(message)
        self.code = code
        self.index = index
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One etcd client URL: `base` is used for requests, `url` (password masked) for messages."""

    url: str
    base: str
    username: str = ""
    password: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class V2Response:
    """Successful v2 response: the JSON body (None when etcd sent none) and the X-Etcd-Index header."""

    body: dict[str, Any] | None
    index: int


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``[http|https://][user:password@]host[:port]``; the scheme defaults to http, the port to 2379.

    Raises `ConfigError` for other schemes, bad ports and missing hosts.
    """
    raw = text.strip()
    if "://" not in raw:
        raw = f"http://{raw}"
    parts = urllib.parse.urlsplit(raw)
    masked = text.replace(parts.password, "***") if parts.password else text
    if parts.scheme not in ("http", "https"):
        raise ConfigError([f"storage endpoint {masked!r}: scheme must be http or https, got {parts.scheme!r}"])
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as error:
        raise ConfigError([f"storage endpoint {masked!r}: invalid port ({error})"]) from error
    host = parts.hostname
    if not host:
        raise ConfigError([f"storage endpoint {masked!r}: host is missing"])
    netloc_host = f"[{host}]" if ":" in host else host
    user = urllib.parse.unquote(parts.username) if parts.username else ""
    password = urllib.parse.unquote(parts.password) if parts.password else ""
    credentials = f"{user}:***@" if user else ""
    base = f"{parts.scheme}://{netloc_host}:{port}"
    return Endpoint(f"{parts.scheme}://{credentials}{netloc_host}:{port}", base, user, password)


def ssl_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext | None:
    """Return the TLS context for https endpoints, or None when no file is configured.

    Without `ca_file` the system CAs verify the server. Raises `ConfigError`
    when a file cannot be loaded.
    """
    if not (ca_file or cert_file or key_file):
        return None
    if bool(cert_file) != bool(key_file):
        raise ConfigError(["storage.cert_file and storage.key_file must be set together for client certificates"])
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError([f"storage TLS files cannot be loaded ({error}); check storage.ca_file, "
                           "storage.cert_file and storage.key_file"]) from error
    return context


def _reason(error: BaseException, timeout: float) -> str:
    """Return a short human reason for a failed request, such as "connection refused"."""
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return f"connecting timed out after {timeout:g}s"
    if isinstance(error, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(error, aiohttp.ClientConnectorError):
        text = str(error.os_error) if error.os_error else str(error)
        return "connection refused" if "refused" in text.lower() else text
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "server closed the connection"
    return str(error) or type(error).__name__


class V2Client:
    """Requests to etcd's v2 HTTP API over one aiohttp session, with endpoint failover.

    `dial_timeout` bounds connecting to one endpoint and `request_timeout`
    each whole request, both in seconds.
    """

    def __init__(self, endpoints: Sequence[Endpoint], *, username: str = "", password: str = "",
                 tls: ssl.SSLContext | None = None, dial_timeout: float = 5.0, request_timeout: float = 5.0):
        self.endpoints = list(endpoints)
        self._username = username
        self._password = password
        self._tls = tls
        self.dial_timeout = dial_timeout
        self.request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None
        self._current = 0

    def urls(self) -> str:
        return ", ".join(endpoint.url for endpoint in self.endpoints)

    def open(self) -> None:
        """Create the session; requests before this raise StorageError."""
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None, connect=self.dial_timeout, sock_connect=self.dial_timeout)
            connector = aiohttp.TCPConnector(ssl=self._tls if self._tls is not None else True)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _headers(self, endpoint: Endpoint) -> dict[str, str]:
        """Return the Authorization header for `endpoint`; credentials in its URL win over the configured ones."""
        if endpoint.username:
            return {"Authorization": aiohttp.encode_basic_auth(endpoint.username, endpoint.password)}
        if self._username:
            return {"Authorization": aiohttp.encode_basic_auth(self._username, self._password)}
        return {}

    async def request(self, method: str, path: str, *, action: str, params: Mapping[str, str] | None = None,
                      form: Mapping[str, str] | None = None) -> V2Response:
        """Send one request and return the response; `path` is already URL-encoded.

        `action` names the operation in messages ("put 'units/a'"). Raises
        `StorageUnavailable`, `Etcd2Error` or `StorageError` as described in
        the module docstring.
        """
        answer = await self._send(method, path, action=action, params=params, form=form, poll_timeout=None)
        assert answer is not None
        return answer

    async def poll(self, path: str, *, action: str, params: Mapping[str, str], poll_timeout: float) -> V2Response | None:
        """Send a long poll and return the response, or None when no event came within `poll_timeout` seconds.

        etcd sends the headers of a watch at once and the body when an event
        arrives, so `request_timeout` bounds the headers only. An empty body
        (etcd dropped the watcher) is returned as a response whose body is None.
        """
        return await self._send("GET", path, action=action, params=params, form=None, poll_timeout=poll_timeout)

    async def _send(self, method: str, path: str, *, action: str, params: Mapping[str, str] | None,
                    form: Mapping[str, str] | None, poll_timeout: float | None) -> V2Response | None:
        session = self._session
        if session is None or session.closed:
            raise StorageError(f"etcd v2 client for {self.urls()} is closed; call connect() before {action}")
        count = len(self.endpoints)
        reasons: list[str] = []
        last: BaseException | None = None
        for offset in range(count):
            index = (self._current + offset) % count
            endpoint = self.endpoints[index]
            try:
                answer = await self._exchange(session, endpoint, method, path, action, params, form, poll_timeout)
            except aiohttp.ClientConnectorCertificateError as error:
                raise StorageError(
                    f"etcd {action} failed: the TLS certificate of {endpoint.url} was rejected ({error.certificate_error}); "
                    "check storage.ca_file"
                ) from error
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
                # Nothing was sent, so trying the next endpoint cannot apply the request twice.
                reason = _reason(error, self.dial_timeout)
                reasons.append(reason if count == 1 else f"{endpoint.url}: {reason}")
                log.debug("etcd endpoint %s failed to connect: %s", endpoint.url, reason)
                last = error
                continue
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                if session.closed:
                    raise StorageError(f"etcd {action} ended: the storage client was closed") from error
                self._current = (index + 1) % count
                raise StorageUnavailable(
                    f"etcd {action} failed at {endpoint.url} ({_reason(error, self.request_timeout)}); "
                    "check that etcd is running, then retry"
                ) from error
            if index != self._current:
                log.info("etcd v2 requests now go to %s", endpoint.url)
                self._current = index
            return answer
        raise StorageUnavailable(
            f"etcd at {self.urls()} is unreachable ({'; '.join(reasons)}); "
            "check [storage] endpoints and that etcd is running with --enable-v2"
        ) from last

    async def _exchange(self, session: aiohttp.ClientSession, endpoint: Endpoint, method: str, path: str,
                        action: str, params: Mapping[str, str] | None, form: Mapping[str, str] | None,
                        poll_timeout: float | None) -> V2Response | None:
        url = yarl.URL(endpoint.base + path, encoded=True)
        async with asyncio.timeout(self.request_timeout) as budget:
            async with session.request(method, url, params=params, data=form, headers=self._headers(endpoint),
                                       allow_redirects=True) as response:
                if poll_timeout is not None and response.status == 200:
                    budget.reschedule(None)
                    try:
                        async with asyncio.timeout(poll_timeout):
                            text = await response.text()
                    except TimeoutError:
                        return None
                else:
                    text = await response.text()
                return self._parse_response(endpoint, action, response.status, response.headers, text)

    def _parse_response(self, endpoint: Endpoint, action: str, status: int, headers: Mapping[str, str], text: str) -> V2Response:
        try:
            index = int(headers.get("X-Etcd-Index", "0"))
        except ValueError:
            index = 0
        body: Any = None
        if text.strip():
            try:
                body = json.loads(text)
            except json.JSONDecodeError:
                body = None
        if isinstance(body, dict) and "errorCode" in body:
            raise self._error(endpoint, action, body, index)
        if 200 <= status < 300:
            if text.strip() and not isinstance(body, dict):
                raise StorageError(f"etcd {action} at {endpoint.url} returned a body that is not a JSON object; check that the endpoint is an etcd client URL")
            return V2Response(body if isinstance(body, dict) else None, index)
        if status == 404:
            raise StorageError(f"etcd at {endpoint.url} does not serve the v2 API (HTTP 404 for {action}); "
                               "start etcd with --enable-v2, or use storage.backend = \"etcd3\"")
        if status == 401:
            raise StorageError(f"etcd at {endpoint.url} rejected the credentials for {action}; "
                               "check storage.username and storage.password")
        if status >= 500:
            raise StorageUnavailable(f"etcd {action} failed at {endpoint.url} (HTTP {status}); retry later")
        raise StorageError(f"etcd {action} failed at {endpoint.url} (HTTP {status}: {text.strip()[:200]})")

    @staticmethod
    def _error(endpoint: Endpoint, action: str, body: dict[str, Any], header_index: int) -> StorageError:
        code = body.get("errorCode")
        message = str(body.get("message", ""))
        cause = str(body.get("cause", ""))
        index = body.get("index") if isinstance(body.get("index"), int) else header_index
        detail = f"errorCode {code}: {message}" + (f" ({cause})" if cause else "")
        if code == UNAUTHORIZED:
            return StorageError(f"etcd at {endpoint.url} rejected the credentials for {action} ({detail}); "
                                "check storage.username and storage.password")
        if code in _UNAVAILABLE_CODES:
            return StorageUnavailable(f"etcd {action} failed at {endpoint.url} ({detail}); retry later")
        return Etcd2Error(f"etcd {action} failed at {endpoint.url} ({detail})",
                          code=code if isinstance(code, int) else 0, index=index, cause=cause)
