"""When a request llama.cpp never answered is sent again: once, to a server chosen again, and only while that is
safe and invisible.

A server killed (or crashed) after a request reached it but before any byte of its answer came back leaves
nothing at the client; a generation has no side effect besides its cost, so the balancer may send the same bytes
again, as Go's net/http and HAProxy's ``retry-on`` do for safe requests. It does so when all of these hold:

- no byte of the answer was relayed (the head goes out with the first body bytes, or after HEAD_AFTER for a
  silent event stream: after that, a stream that breaks is cut visibly, as before);
- the request takes a slot (completions, chats, embeddings ...) or is a GET or HEAD: nothing a router's
  ``/models/load`` or a ``DELETE`` would do twice;
- the failure is no timeout (a server that is slow is not dead: sending it again would run it twice) and not the
  client's own leaving;
- the client is still connected;
- it was not retried already (a request that crashes llama.cpp must not crash a second server).

The body is kept (it was read whole before the first send). The broken server is quarantined (for
``--quarantine-duration``, or until its agent reports it healthy), so the retry goes to another one; it takes a slot
again through the buffer, so it may wait for one (a lone server that is restarting, say).
"""

from __future__ import annotations

from typing import Any

import urllib3.exceptions

from paddler_sync.sockets import peer_has_closed

RETRIED = "paddler_sync.retried"  # the environ key: 1 when the request was sent again (access log, metrics)
SAFE_METHODS = frozenset({"GET", "HEAD"})


def may_send_again(environ: dict[str, Any], takes_slot: bool, exc: BaseException) -> bool:
    if environ.get(RETRIED) or not (takes_slot or environ["REQUEST_METHOD"] in SAFE_METHODS):
        return False
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError | TimeoutError):
        return False
    sock = environ.get("gunicorn.socket")
    return sock is None or not peer_has_closed(sock)
