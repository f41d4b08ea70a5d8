"""Typed exceptions raised inside the library.

Every error a user can cause names what was wrong (``param`` is the request field or config path).
The HTTP layer maps these to OpenAI's error JSON in one function; nothing else converts them.
"""

from __future__ import annotations


class ComposeError(Exception):
    """Base class of every error this library raises on purpose."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # Keep ``param`` (and subclass fields) across pickling, e.g. from a Ray replica.
        return (_rebuild, (type(self), self.message, self.param, dict(self.__dict__)))


def _rebuild(cls, message, param, state):
    error = cls.__new__(cls)
    ComposeError.__init__(error, message, param)
    error.__dict__.update(state)
    return error


class InvalidRequestError(ComposeError, ValueError):
    """A request or sampling field is out of range or of the wrong kind (HTTP 400)."""

    status_code = 400
    error_type = "invalid_request_error"


class ConfigError(ComposeError, ValueError):
    """A composition config is invalid; ``param`` is the dotted path of the field."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt plus max_tokens exceed a member's context length."""


class ModelNotFoundError(ComposeError):
    """No composition or member is served under that name (HTTP 404)."""

    status_code = 404
    error_type = "not_found_error"


class AuthenticationError(ComposeError):
    """Missing or wrong API key (HTTP 401)."""

    status_code = 401
    error_type = "invalid_request_error"


class PayloadTooLargeError(InvalidRequestError):
    """The request body is over the server's limit (HTTP 413)."""

    status_code = 413


class QueueFullError(ComposeError):
    """The waiting queue is at its bound (HTTP 429 with Retry-After)."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(ComposeError):
    """The engine's step loop has stopped, or its replica is down (HTTP 503); with
    ``retry_after`` (seconds) when it is expected back (a replica that Ray restarts)."""

    status_code = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, param)
        self.retry_after = retry_after


class RequestFailedError(ComposeError):
    """This request failed inside the engine (a bug its input reached); the others went on (HTTP 500)."""

    status_code = 500
    error_type = "internal_error"


class StepFailedError(ComposeError):
    """A step raised while this request was in the batch; the engine went on (HTTP 500)."""

    status_code = 500
    error_type = "internal_error"


class RequestTimeoutError(ComposeError):
    """A request ran past the server's per-request timeout (HTTP 504)."""

    status_code = 504
    error_type = "timeout_error"
