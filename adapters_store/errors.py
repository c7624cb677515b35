"""The store's one exception hierarchy. Each says what went wrong in the store's terms; the API maps
them to HTTP statuses in one place (service/api/errors.py), the worker to refused jobs."""

from __future__ import annotations


class StoreError(Exception):
    """A refused store operation: a message for the operator, and the field or file at fault if any."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


class Invalid(StoreError):
    """Malformed input: a bad name, a reference that is not `name@N`, a file that is not what it says."""


class NotFound(StoreError):
    """No such base, version, alias or rollout."""


class Conflict(StoreError):
    """The store's state forbids it now: an alias points to the version, it moved meanwhile, a name is taken."""


class Incompatible(StoreError):
    """Well-formed but unusable here: built on another base, shapes or modules the base lacks, over a limit."""


class TooLarge(StoreError):
    """Over a size limit; refused before it was read whole."""


class UnsafeFormat(StoreError):
    """A format that is never loaded (pickle)."""


# The registry's Lua scripts refuse with an error reply '<KIND> <message>'; these are the kinds.
BY_KIND: dict[str, type[StoreError]] = {
    "INVALID": Invalid, "NOT_FOUND": NotFound, "CONFLICT": Conflict, "INCOMPATIBLE": Incompatible,
}


class NotReplicated(StoreError):
    """Written on the primary, but not confirmed by enough replicas in time: it may not survive a failover."""


# Not a StoreError: nothing about the request is wrong, the storage is (for now) out of reach, so the
# worker retries a job that meets it instead of refusing it for good.
class BlobStorageError(Exception):
    """The blob storage (S3 or another S3 API server) failed or is unreachable; the message names what and where."""


class EmbeddedRedisFailed(Exception):
    """The embedded redis-server could not start (its port taken by another program or another data dir's
    Redis, or its binary missing): a start-up problem for the operator, not a refused request."""
