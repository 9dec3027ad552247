"""Has the peer of a socket closed its side? Asked without blocking and without switching greenlets.

``select.select`` cannot watch descriptors above 1024 (a balancer with thousands of waiting clients
has them), and gevent's patched calls would yield to the hub; the original ``poll`` has neither
problem, and with a zero timeout it only asks the kernel.
"""

from __future__ import annotations

import socket

try:
    from gevent.monkey import get_original

    _poll = get_original("select", "poll")
except (ImportError, AttributeError):  # pragma: no cover - gevent is a dependency
    import select

    _poll = select.poll

_READABLE = 0x001 | 0x008 | 0x010  # POLLIN | POLLERR | POLLHUP


def peer_has_closed(sock: socket.socket) -> bool:
    """True when the peer closed (or reset) the connection; pending data counts as still open."""
    try:
        poller = _poll()
        poller.register(sock.fileno(), _READABLE)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
