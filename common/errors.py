"""The one exception family of mell, with stable codes and HTTP statuses.

An error class is named `...Error` where an event (common.events) names the same fact:
`WorkerLostError` is what a client sees, `WorkerLost` what the cluster records.

Errors cross process boundaries as data (code + message), never as tracebacks.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable machine-readable error kinds; the value is the OpenAI-style error `type`."""

    INVALID_REQUEST = "BadRequestError"
    UNAUTHORIZED = "AuthenticationError"
    NOT_FOUND = "NotFoundError"
    OVERLOADED = "RateLimitError"
    NO_CAPACITY = "ServiceUnavailableError"
    CONFLICT = "ConflictError"
    WORKER_LOST = "WorkerLostError"
    ABORTED = "RequestAbortedError"
    MIGRATION_FAILED = "MigrationFailedError"
    PROTOCOL = "ProtocolError"
    CONFIG = "ConfigError"
    MODEL = "ModelError"
    JOURNAL = "JournalError"
    INTERNAL = "InternalServerError"


class MellError(Exception):
    """Base of every mell error: message, stable `code`, HTTP status, optional param."""

    code: ErrorCode = ErrorCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(MellError):
    """The client's request is malformed or its parameters are out of range."""

    code = ErrorCode.INVALID_REQUEST
    http_status = 400


class Unauthorized(MellError):
    """Missing or wrong API key / admin token."""

    code = ErrorCode.UNAUTHORIZED
    http_status = 401


class NotFound(MellError):
    """Unknown model, request, worker or route."""

    code = ErrorCode.NOT_FOUND
    http_status = 404


class Overloaded(MellError):
    """The bounded admission queue is full; retry later."""

    code = ErrorCode.OVERLOADED
    http_status = 429


class NoCapacity(MellError):
    """No live worker can take the request now."""

    code = ErrorCode.NO_CAPACITY
    http_status = 503


class Conflict(MellError):
    """The thing asked for cannot happen in the target's present state (e.g. sleeping a
    worker that holds requests)."""

    code = ErrorCode.CONFLICT
    http_status = 409


class WorkerLostError(MellError):
    """The worker serving a request died or stopped answering."""

    code = ErrorCode.WORKER_LOST
    http_status = 502


class RequestAbortedError(MellError):
    """The request was aborted (client gone, shutdown, operator)."""

    code = ErrorCode.ABORTED
    http_status = 499


class MigrationFailed(MellError):
    """A migration could not complete; the request stays on its source."""

    code = ErrorCode.MIGRATION_FAILED
    http_status = 500


class ProtocolError(MellError):
    """A frame or message that does not decode to the channel's type."""

    code = ErrorCode.PROTOCOL
    http_status = 500


class ConfigError(MellError):
    """A configuration file or flag is invalid; the message names the file and the key."""

    code = ErrorCode.CONFIG
    http_status = 500


class ModelError(MellError):
    """A checkpoint cannot be loaded: unsupported architecture, missing or mis-shaped tensor."""

    code = ErrorCode.MODEL
    http_status = 500


class JournalError(MellError):
    """The journal on disk is corrupt or unreadable; the message names segment and offset."""

    code = ErrorCode.JOURNAL
    http_status = 500


class JournalInUse(JournalError):
    """The journal's writer lock is held: another gateway runs on the same data directory."""
