"""Has the peer of a socket closed its side? Asked without blocking and without switching greenlets.

``select.select`` cannot watch descriptors above 1024 (a balancer with thousands of waiting clients
has them), and gevent's patched calls would yield to the hub; the original ``poll`` has neither
problem, and with a zero timeout it only asks the kernel.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

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


def send_all(sock: Any, data: bytes) -> None:
    """One ``send`` when the peer's window has room (nearly always), more only for what did not fit.

    gevent's ``sendall`` also asks the kernel for the send-buffer size and reads the clock on every call."""
    sent = sock.send(data)
    if sent < len(data):
        view = memoryview(data)
        while sent < len(data):
            sent += sock.send(view[sent:])


class ClientWatch:
    """Calls ``on_gone`` once if the client closes its connection, costing nothing until then.

    A request that waits for a slot writes nothing, so a vanished client would go unnoticed; a
    read watcher on its socket wakes only when something arrives. Pipelined data (the client's next
    request) also wakes it: then the watcher stops and the client counts as present.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._watcher: Any = None  # gevent's io watcher while watching

    def start(self, on_gone: Callable[[], None]) -> None:
        import gevent

        def readable() -> None:
            self.stop()
            if peer_has_closed(self.sock):
                on_gone()

        self._watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)
        self._watcher.start(readable)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None
