"""The daemon refuses a storage backend that lacks what the transport needs."""

from __future__ import annotations

import pytest

from fleetkit.core import plugins
from fleetkit.core.daemon import check_capabilities
from fleetkit.core.errors import FleetkitError
from fleetkit.core.storage import Capabilities


class NeedsWatch:
    name = "needs-watch"
    required_capabilities = frozenset({"native_watch", "multi_key_transactions"})


class PollOnlyStore:
    name = "poll-only"
    capabilities = Capabilities(
        linearizable_writes=True, native_watch=False, lease_ttl=True, multi_key_transactions=False,
    )


def test_missing_capability_named():
    with pytest.raises(FleetkitError) as caught:
        check_capabilities(PollOnlyStore, NeedsWatch)

    message = str(caught.value)
    assert "poll-only" in message
    assert "needs-watch" in message
    assert "multi_key_transactions" in message
    assert "native_watch" in message


@pytest.mark.parametrize("backend", ["etcd3", "etcd2", "redis", "embedded"])
@pytest.mark.parametrize("transport", ["grpc", "etcd-watch"])
def test_builtin_backends_run_transports(backend, transport):
    storage_class = plugins.load_driver(plugins.STORAGE, backend)
    transport_class = plugins.load_driver(plugins.TRANSPORT, transport)

    check_capabilities(storage_class, transport_class)

    assert isinstance(storage_class.capabilities, Capabilities)


def test_unknown_backend_lists_installed():
    with pytest.raises(FleetkitError) as caught:
        plugins.load_driver(plugins.STORAGE, "etcd4")

    assert "etcd3" in str(caught.value)
    assert "redis" in str(caught.value)
