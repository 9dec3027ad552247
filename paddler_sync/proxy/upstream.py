"""Talking to llama.cpp: the pooled requests session, header rules, and which paths take a slot.

The session trusts no environment (no proxy, netrc or CA-bundle lookups on every request: a free
+29 % in shared/reference/proxy-anchors.md), sends only the client's headers, never retries a
request that reached a server, and forwards bodies byte for byte (no decoding), so Content-Length
and Content-Encoding stay true.
"""

from __future__ import annotations

import logging
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3 import HTTPConnectionPool, HTTPResponse
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import Timeout

# Paths that become a llama.cpp task and so need a slot (native and OpenAI-compatible names).
SLOT_PATHS = frozenset({
    "/completion", "/completions", "/v1/completions", "/chat/completions", "/v1/chat/completions",
    "/infill", "/embedding", "/embeddings", "/v1/embeddings",
    "/rerank", "/reranking", "/v1/rerank", "/v1/reranking",
})

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection"})


def uses_slot(method: str, path: str) -> bool:
    return method == "POST" and path in SLOT_PATHS


class Transport:
    """Sends requests to llama.cpp servers through a requests session's connection pools.

    The session (and its mounted HTTPAdapter) owns the pools: one per server, at most
    ``pool_size`` idle connections each, no retries. The hot path then calls the server's pool
    directly: requests' per-request layers (preparing, merging settings, hooks, cookies, the
    Response wrapper) cost more CPU than the rest of the proxy together, and a proxy needs none
    of them (bench/RESULTS.md has the profile).
    """

    def __init__(self, pool_size: int, connect_timeout: float, read_timeout: float) -> None:
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers = CaseInsensitiveDict()
        self.adapter = HTTPAdapter(pool_connections=1024, pool_maxsize=pool_size, pool_block=False, max_retries=0)
        self.session.mount("http://", self.adapter)
        self.timeout = Timeout(connect=connect_timeout, read=read_timeout)
        self._pools: dict[str, HTTPConnectionPool] = {}
        # A full pool discards the extra connection: expected under bursts, not worth a warning per request.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)

    def send(self, method: str, addr: str, target: str, headers: dict[str, str], body: bytes | None) -> HTTPResponse:
        pool = self._pools.get(addr)
        if pool is None or pool.pool is None:  # built once by the adapter's pool manager (None: it closed it)
            host, _, port = addr.rpartition(":")
            pool = self._pools[addr] = self.adapter.poolmanager.connection_from_host(host.strip("[]"), int(port),
                                                                                     scheme="http")
        return pool.urlopen(method, target, body=body, headers=headers, retries=False, redirect=False,
                            assert_same_host=False, preload_content=False, decode_content=False,
                            timeout=self.timeout)


def request_headers(environ: dict[str, Any], upstream_addr: str, rewrite_host: bool,
                    body_length: int) -> dict[str, str]:
    """The client's headers minus hop-by-hop ones, plus X-Forwarded-*; Host kept unless rewritten."""
    connection_tokens = {t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")}
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if not key.startswith("HTTP_"):
            continue
        name = key[5:].replace("_", "-").title()
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in connection_tokens or lowered == "content-length":
            continue
        headers[name] = value
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    if body_length or environ["REQUEST_METHOD"] in ("POST", "PUT", "PATCH"):
        headers["Content-Length"] = str(body_length)
    if rewrite_host or "Host" not in headers:
        headers["Host"] = upstream_addr
    client = environ.get("REMOTE_ADDR", "")
    previous = headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{previous}, {client}" if previous else client
    headers["X-Forwarded-Proto"] = environ.get("wsgi.url_scheme", "http")
    return headers


def response_headers(upstream: HTTPResponse) -> list[tuple[str, str]]:
    connection_tokens = {t.strip().lower() for t in upstream.headers.get("Connection", "").split(",")}
    headers = [(k, v) for k, v in upstream.headers.items()
               if k.lower() not in HOP_BY_HOP and k.lower() not in connection_tokens]
    if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
        headers.append(("X-Accel-Buffering", "no"))
        if "Cache-Control" not in upstream.headers:
            headers.append(("Cache-Control", "no-cache"))
    return headers


def is_connect_failure(exc: Exception) -> bool:
    """True when nothing reached the server (refused, unreachable, connect timeout): safe to retry elsewhere."""
    return isinstance(exc, NewConnectionError | ConnectTimeoutError)
