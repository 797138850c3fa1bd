"""A pure ASGI wrapper in front of the app (streams and disconnects pass through untouched):
the API key, the body size limit by Content-Length, and requests counted by endpoint and status."""

from __future__ import annotations

import hmac
import json

from kiln.serve.metrics import Metrics

ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"}
OPEN = {"/health"}  # answered without the API key (a load balancer's probe)


async def _refuse(send, status: int, message: str, type: str, code: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body: int):
        self.app, self.metrics, self.api_key, self.max_body = app, metrics, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = {"code": 0}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self.api_key is not None and path not in OPEN:
                given = headers.get(b"authorization", b"").decode("latin-1")
                scheme, _, token = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                    self.metrics.inc("kiln_rejections_total", model="", reason="unauthorized")
                    return await _refuse(counted, 401, "a valid API key is required: Authorization: Bearer KEY",
                                         "authentication_error", "invalid_api_key",
                                         [(b"www-authenticate", b"Bearer")])
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                self.metrics.inc("kiln_rejections_total", model="", reason="body_too_large")
                return await _refuse(counted, 413, f"the request body is larger than {self.max_body} bytes",
                                     "invalid_request_error", "body_too_large")
            await self.app(scope, receive, counted)
        finally:
            self.metrics.inc("kiln_requests_total", endpoint=endpoint, status=status["code"] or 499)
