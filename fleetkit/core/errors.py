"""The exception tree of fleetkit.

Every error that fleetkit raises on purpose derives from `FleetkitError`. Each
layer has its own subclass, and drivers translate the errors of their client
libraries into these once, at the edge, with the original chained as the cause.
A message names what failed, the value involved and what to do next.
"""


class FleetkitError(Exception):
    """Root of all errors that fleetkit raises on purpose."""


class ConfigError(FleetkitError):
    """The configuration is invalid; `problems` lists every finding."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class UnitError(FleetkitError):
    """A unit file or unit name is invalid."""


class StorageError(FleetkitError):
    """A storage operation failed."""


class StorageUnavailable(StorageError):
    """The store cannot be reached; the operation may succeed when retried."""


class FencingError(StorageError):
    """A fenced write was rejected because the writer no longer holds leadership."""


class LeaseExpired(StorageError):
    """The lease no longer exists in the store."""


class CompactedError(StorageError):
    """A watch asked for a revision that the store has already discarded."""

    def __init__(self, message: str, *, compact_revision: int = 0):
        super().__init__(message)
        self.compact_revision = compact_revision


class RuntimeBackendError(FleetkitError):
    """The local service manager refused or failed an operation."""


class TransportError(FleetkitError):
    """The engine–agent transport failed."""


class ApiError(FleetkitError):
    """A control API request failed; `code` is a gRPC status name."""

    def __init__(self, message: str, *, code: str = "UNKNOWN"):
        super().__init__(message)
        self.code = code
