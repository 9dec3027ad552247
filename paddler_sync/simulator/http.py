"""The simulator's HTTP plumbing, as llama.cpp's cpp-httplib server behaves: requests, headers, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from paddler_sync.simulator.payloads import dumps
from paddler_sync.sockets import peer_has_closed

StartResponse = Callable[..., Callable[[bytes], None]]
JSON = "application/json; charset=utf-8"


class HttpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Request:
    """The few things a handler needs from the WSGI environ."""

    __slots__ = ("environ", "origin", "start_response")

    def __init__(self, environ: dict[str, Any], origin: str, start_response: StartResponse) -> None:
        self.environ = environ
        self.origin = origin
        self.start_response = start_response

    @property
    def query(self) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl(self.environ.get("QUERY_STRING", "")))

    def body_json(self) -> dict[str, Any]:
        raw = self.environ["wsgi.input"].read()
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise HttpError(500, nlohmann_parse_error(exc)) from None
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        return body

    def json(self, body: Any, code: int = 200) -> list[bytes]:
        data = dumps(body)
        self.start_response(STATUS[code], common_headers(self.origin, JSON, len(data)))
        return [data]

    def client_gone(self) -> bool:
        sock = self.environ.get("simulator.socket")
        return sock is not None and peer_has_closed(sock)


STATUS = {200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized", 404: "404 Not Found",
          500: "500 Internal Server Error", 501: "501 Not Implemented", 503: "503 Service Unavailable"}


def common_headers(origin: str, content_type: str, length: int) -> list[tuple[str, str]]:
    return [("Keep-Alive", "timeout=5, max=100"), ("Content-Type", content_type), ("Server", "llama.cpp"),
            ("Content-Length", str(length)), ("Access-Control-Allow-Origin", origin)]


def closing(start_response: StartResponse) -> StartResponse:
    """Say ``Connection: close`` when the client asked to close, as llama.cpp's HTTP server does."""

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        kept = [(k, v) for k, v in headers if k != "Keep-Alive"]  # one or the other, as cpp-httplib says
        return start_response(status, [*kept, ("Connection", "close")], exc_info)

    return start


def nlohmann_parse_error(exc: ValueError) -> str:
    line, column = getattr(exc, "lineno", 1), getattr(exc, "colno", 1)
    reason = getattr(exc, "msg", str(exc))
    return (f"[json.exception.parse_error.101] parse error at line {line}, column {column}: "
            f"syntax error while parsing value - {reason}")
