"""The exceptions edgellm raises on purpose, and the HTTP status each one maps to.

    EdgeLLMError                      500  base; message is safe to show
    ├── ValidationError               400  bad input; names the offending `param`
    │   ├── ContextOverflow           400  prompt + max_tokens cannot fit the KV cache
    │   └── OutputConstraintError     400  the output format (grammar) could not be enforced
    ├── AuthError                     401  no key, or not a valid one
    ├── Forbidden                     403
    ├── ModelNotFound                 404
    ├── RouteNotFound                 404  no such path
    ├── MethodNotAllowed              405
    ├── RequestTimeout                408  the body did not arrive in time
    ├── PayloadTooLarge               413
    ├── UnsupportedMediaType          415  a web page's POST that is not JSON
    ├── RateLimited                   429
    ├── QueueFull                     503  carries Retry-After seconds
    ├── NotReady                      503  model still loading
    ├── Draining                      503  shutting down: no new requests; carries Retry-After
    │   └── DrainTimeout              503  cut off when the drain's timeout passed
    ├── AuditUnavailable              503  the audit log cannot be written; carries Retry-After
    ├── ModelFileError                -    a model file that must not reach llama.cpp (CLI)
    └── EngineError                   500  internal; the message is ours, shown in streams
        └── EngineDown                503  the engine stopped; restart the process

Each class says whether its message may be shown to a client (`shown`); the others are
answered "internal server error". A class that refuses a request before any work on it names the
`rejection` reason it is counted under (edgellm_requests_rejected_total); failures do not. The
server renders every one of them, from a route, a
middleware or the middle of a stream, with one function per API shape (`edgellm.server.errors`);
the CLI prints the message as one line.
"""

from __future__ import annotations


class EdgeLLMError(Exception):
    """Base of every error edgellm raises deliberately."""

    status_code = 500
    error_type = "server_error"
    shown = False  # whether a client may read the message; else "internal server error"
    rejection: str | None = None  # the reason a refused request is counted under; None: a failure

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the answer to this error carries."""
        return {}


class ValidationError(EdgeLLMError):
    rejection: str | None = "invalid"
    status_code = 400
    error_type = "invalid_request_error"
    shown = True


class ContextOverflow(ValidationError):
    def __init__(self, message: str, *, param: str | None = "max_tokens"):
        super().__init__(message, param=param, code="context_length_exceeded")


class OutputConstraintError(ValidationError):
    """A request's grammar allowed no next token, or its sandbox timed out or died. Raised
    after generation began; the API names the field the grammar came from."""

    rejection = None  # generation had begun: a failure, not a refusal

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, param=param, code="output_constraint_failed")


class AuthError(EdgeLLMError):
    rejection = "unauthorized"
    status_code = 401
    error_type = "authentication_error"
    shown = True

    def __init__(self, message: str, *, code: str | None = "invalid_api_key"):
        super().__init__(message, code=code)

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(EdgeLLMError):
    rejection = "forbidden"
    status_code = 403
    error_type = "permission_error"
    shown = True


class ModelNotFound(EdgeLLMError):
    rejection = "not_found"
    status_code = 404
    error_type = "invalid_request_error"
    shown = True

    def __init__(self, model: str):
        super().__init__(
            f"The model '{model}' does not exist", param="model", code="model_not_found"
        )


class RouteNotFound(EdgeLLMError):
    rejection = "not_found"
    status_code = 404
    error_type = "not_found_error"
    shown = True


class MethodNotAllowed(EdgeLLMError):
    rejection = "invalid"
    status_code = 405
    error_type = "invalid_request_error"
    shown = True

    def __init__(self, message: str, *, allow: str | None = None):
        super().__init__(message)
        self.allow = allow

    @property
    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow} if self.allow else {}


class RequestTimeout(EdgeLLMError):
    rejection = "timeout"
    status_code = 408
    error_type = "invalid_request_error"
    shown = True


class PayloadTooLarge(EdgeLLMError):
    rejection = "too_large"
    status_code = 413
    error_type = "invalid_request_error"
    shown = True


class UnsupportedMediaType(EdgeLLMError):
    rejection = "invalid"
    status_code = 415
    error_type = "invalid_request_error"
    shown = True


class _TryLater(EdgeLLMError):
    """An error the client may retry after `retry_after_s` seconds (the Retry-After header)."""

    shown = True

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RateLimited(_TryLater):
    rejection = "rate_limited"
    status_code = 429
    error_type = "rate_limit_error"


class QueueFull(_TryLater):
    rejection = "queue_full"
    status_code = 503
    error_type = "server_overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message, retry_after_s=retry_after_s, code="queue_full")


class Draining(_TryLater):
    """The server is shutting down (SIGTERM): it takes no new requests, and ends those still
    running with this error when its drain timeout passes. Retry elsewhere, or here once it
    has restarted."""

    rejection: str | None = "draining"
    status_code = 503
    error_type = "server_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message, retry_after_s=retry_after_s, code="draining")


class DrainTimeout(Draining):
    """A request the drain cut off when its timeout passed: a failure, not a refusal."""

    rejection: str | None = None


class AuditUnavailable(_TryLater):
    """The audit log cannot be written (disk full, database locked): with --audit-required the
    server takes no new requests until it can again (what it took is still recorded)."""

    rejection = "audit_unavailable"
    status_code = 503
    error_type = "server_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message, retry_after_s=retry_after_s, code="audit_unavailable")


class NotReady(EdgeLLMError):
    rejection = "not_ready"
    status_code = 503
    error_type = "server_not_ready"
    shown = True


class ModelFileError(EdgeLLMError):
    """A model file that is missing, unreadable, or not a well-formed GGUF."""

    status_code = 500


class EngineError(EdgeLLMError):
    """Something broke inside the engine. The message is ours (never a library's text), so a
    client may read it: it is why its request ended."""

    shown = True


class EngineDown(EngineError):
    """The engine stopped after an internal error; the process must be restarted (its health
    check says so, for the orchestrator)."""

    rejection = "engine_down"
    status_code = 503
    error_type = "server_error"

    def __init__(self, message: str):
        super().__init__(message, code="engine_down")
