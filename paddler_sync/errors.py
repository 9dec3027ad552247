"""Error bodies in the OpenAI shape, which every client of a llama.cpp fleet already parses."""

from __future__ import annotations

import json
from typing import Any

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
         413: "invalid_request_error", 414: "invalid_request_error", 417: "invalid_request_error",
         429: "rate_limit_error", 431: "invalid_request_error", 500: "server_error", 501: "invalid_request_error",
         502: "server_error", 503: "unavailable_error", 504: "timeout_error"}

REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large", 414: "URI Too Long",
           417: "Expectation Failed", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout"}


# Marks the answers a balancer gives itself (the proxy's refusals, every management answer), so an agent
# pointed at a balancer's port by mistake can say so instead of "unexpected status".
OWN_ANSWER_HEADER = "X-Paddler-Sync"
OWN_ANSWER = (OWN_ANSWER_HEADER, "proxy")


class Refused(ValueError):
    """Input refused with a reason: ``status`` is the HTTP status to answer, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_body(status: int, message: str, code: str | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``extra``: fields beside the message (the models that exist, a context's numbers)."""
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"),
                      "code": code or REASONS.get(status, "error").lower().replace(" ", "_"), **(extra or {})}}


def error_bytes(status: int, message: str, code: str | None = None, extra: dict[str, Any] | None = None) -> bytes:
    return json.dumps(error_body(status, message, code, extra)).encode()


def status_line(status: int) -> str:
    return f"{status} {REASONS.get(status, 'Error')}"
