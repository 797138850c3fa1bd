"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations


class APIError(Exception):
    """A request the server refuses or cannot finish; `body()` is what the client gets."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def overloaded(model: str, retry_after: int) -> APIError:
    return APIError(429, f"the queue for model '{model}' is full; retry after {retry_after} s",
                    "rate_limit_error", None, "queue_full", {"Retry-After": str(retry_after)})


def internal(message: str) -> APIError:
    return APIError(500, message, "server_error", None, "internal_error")
