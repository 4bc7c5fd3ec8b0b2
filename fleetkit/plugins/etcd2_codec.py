"""How the etcd v2 backend lays out keys and values in etcd's v2 key tree.

Keys: etcd v2 keeps a tree in which a node is either a directory or a value,
so the contract keys ``a`` and ``a/b`` could not both exist. etcd also cleans
paths (``a//b``, ``.``, ``..``) and hides names starting with ``_``. The
backend therefore stores every contract key as one value node directly in
the directory of the storage prefix (the namespace), with the key
percent-encoded into a single path segment: ``units/web.service`` under
prefix ``/fleetkit/`` is the node ``/fleetkit/units%2Fweb.service``. A
leading ``_`` or ``.`` is encoded too, so names that start with ``.`` are
free for the backend's own bookkeeping (``.leases``).

Values: etcd v2 values are strings. A value that is UTF-8 text, not attached
to a lease and not starting with ``~`` is stored as it is, so JSON records
stay readable with etcdctl. Any other value is stored as
``~<lease id in hex>:t:<text>`` or ``~<lease id in hex>:b:<base64>``. The
lease id in the value is how `get` and `list` report a key's lease.
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import urllib.parse
from typing import Any

from fleetkit.core.errors import StorageError
from fleetkit.core.storage import KeyValue

API_ROOT = "/v2/keys"
LEASES = ".leases"
_MARK = "~"
# Characters kept as they are in node names, besides letters, digits and "_.-~".
_SAFE = ":@=+,"


class KeySpace:
    """Maps contract keys to etcd v2 node paths under one storage prefix, and back."""

    def __init__(self, prefix: str):
        cleaned = posixpath.normpath("/" + prefix.strip("/")) if prefix.strip("/") else "/"
        self.namespace = cleaned.rstrip("/")  # "" for the root directory
        self.lease_dir = f"{self.namespace}/{LEASES}"

    # -- keys ------------------------------------------------------------------

    def node_name(self, key: str) -> str:
        """Return the single path segment that stores `key`; raises StorageError for the empty key."""
        if not key:
            raise StorageError("the empty key cannot be stored; use a non-empty key")
        name = urllib.parse.quote(key, safe=_SAFE)
        if name[0] in "_.":
            name = f"%{ord(name[0]):02X}{name[1:]}"
        return name

    def node_key(self, key: str) -> str:
        """Return the etcd node key (an unencoded path) that stores `key`."""
        return f"{self.namespace}/{self.node_name(key)}"

    def key_path(self, key: str) -> str:
        """Return the URL path of `key`, encoded for the request line."""
        return url_path(self.node_key(key))

    def namespace_path(self) -> str:
        return url_path(self.namespace or "/")

    def lease_path(self, lease: int | None = None) -> str:
        return url_path(self.lease_dir if lease is None else f"{self.lease_dir}/{lease:020d}")

    def key_of(self, node_key: str) -> str | None:
        """Return the contract key stored at etcd node `node_key`, or None when the node is not a key of ours."""
        parent, _, name = node_key.rpartition("/")
        if parent != self.namespace or not name or name[0] in "_.":
            return None
        return urllib.parse.unquote(name)

    def key_value(self, node: dict[str, Any]) -> KeyValue | None:
        """Return the contract view of a value node, or None for directories and foreign nodes."""
        if node.get("dir"):
            return None
        key = self.key_of(str(node.get("key", "")))
        if key is None:
            return None
        value, lease = decode_value(node.get("value", ""))
        return KeyValue(key=key, value=value, create_revision=int(node["createdIndex"]),
                        mod_revision=int(node["modifiedIndex"]), lease=lease)


def url_path(node_key: str) -> str:
    """Return the request path of the v2 keys API for an unencoded node key."""
    return API_ROOT + urllib.parse.quote(node_key, safe="/")


# -- values --------------------------------------------------------------------


def encode_value(value: bytes, lease: int = 0) -> str:
    """Return the string that etcd stores for `value` attached to `lease` (0 for none)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return f"{_MARK}{lease:x}:b:{base64.b64encode(value).decode('ascii')}"
    if lease == 0 and not text.startswith(_MARK):
        return text
    return f"{_MARK}{lease:x}:t:{text}"


def decode_value(stored: str) -> tuple[bytes, int]:
    """Return the value bytes and the lease id of a stored string.

    A string starting with ``~`` that is not in the encoded form (written by
    another tool) is returned as it is, with no lease.
    """
    if not stored.startswith(_MARK):
        return stored.encode("utf-8"), 0
    lease_text, sep, rest = stored[1:].partition(":")
    kind, sep2, payload = rest.partition(":")
    try:
        lease = int(lease_text, 16)
        if sep and sep2 and kind == "t":
            return payload.encode("utf-8"), lease
        if sep and sep2 and kind == "b":
            return base64.b64decode(payload, validate=True), lease
    except (ValueError, binascii.Error):
        pass
    return stored.encode("utf-8"), 0
