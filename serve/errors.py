"""The HTTP errors: one status per kind, answered as ``{"error": "...", "error_type": "..."}`` (as TEI does)."""

from __future__ import annotations

STATUS = {
    "malformed": 400,  # not JSON, not UTF-8, not the protocol's shape
    "unauthorized": 401,  # missing or wrong API key
    "not_found": 404,  # unknown model or route
    "method_not_allowed": 405,
    "payload_too_large": 413,  # body over --payload-limit
    "validation": 422,  # well-formed but not acceptable: wrong types, empty, too many texts, a text too long
    "overloaded": 429,  # the model's queue is full
    "internal": 500,  # a bug: logged with the request id
    "unavailable": 503,  # not ready, draining, or the model is loading
    "timeout": 504,  # --request-timeout passed
}


class ApiError(Exception):
    def __init__(self, error_type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.status = STATUS[error_type]
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": str(self), "error_type": self.error_type}
