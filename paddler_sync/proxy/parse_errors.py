"""JSON answers for requests gunicorn refuses before the proxy sees them.

gunicorn parses the request line and headers itself and, when they break a limit or the protocol,
writes an HTML page. Clients of an OpenAI-style API parse ``{"error": ...}``, so those answers are
rewritten here with the same status gunicorn would choose and a message naming the setting to raise.
Errors of the application itself stay with gunicorn's handler (they are ours to log as 500s).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gunicorn.http import errors as http_errors

from paddler_sync.errors import error_bytes, status_line

logger = logging.getLogger("paddler_sync.proxy")

Handler = Callable[[Any, Any, Any, BaseException], None]

# What a refused request is told, by exception class; anything else that gunicorn deems the
# client's fault is a plain 400 carrying gunicorn's own description.
EXPLAINED: dict[type[BaseException], tuple[int, str]] = {
    http_errors.LimitRequestLine: (414, "the request line is too long ({detail}); the limit is the balancer's "
                                        "--max-request-line"),
    http_errors.LimitRequestHeaders: (431, "the request headers are too large or too many ({detail}); the limits "
                                           "are the balancer's --max-header-size and --max-headers"),
    http_errors.UnsupportedTransferCoding: (501, "{detail}"),
    http_errors.ExpectationFailed: (417, "{detail}"),
    http_errors.ForbiddenProxyRequest: (403, "request forbidden"),
}
APPLICATION_FAULTS = (http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName,
                      http_errors.ConfigurationProblem)


def describe(exc: BaseException) -> tuple[int, str]:
    for kind, (status, template) in EXPLAINED.items():
        if isinstance(exc, kind):
            return status, template.format(detail=exc)
    return 400, f"malformed HTTP request: {exc}"


def is_client_fault(exc: BaseException) -> bool:
    return isinstance(exc, http_errors.ParseException) and not isinstance(exc, APPLICATION_FAULTS)


def json_error_handler(original: Handler, log: Any) -> Handler:
    """Wrap a gunicorn worker's ``handle_error``: client faults get JSON, the rest the original."""

    def handle_error(req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if not is_client_fault(exc):
            original(req, client, addr, exc)
            return
        status, message = describe(exc)
        peer = addr[0] if addr else "unix socket"
        log.warning("refused a malformed request from %s: %s", peer, exc)
        body = error_bytes(status, message)
        head = (f"HTTP/1.1 {status_line(status)}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        try:
            client.sendall(head + body)
        except OSError:
            logger.debug("could not send the %d to %s: it left", status, peer)

    return handle_error
