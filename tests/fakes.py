"""What the tests share besides processes (those are in helpers.py): stand-ins for what a unit test must not
wait for or open."""

from __future__ import annotations

from collections.abc import Callable


class Clock:
    """A clock the test moves by hand (``clock.now += 5``): the ledger, the buffer and the registry take one."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeWatch:
    """Stands in for the client-socket watcher: the test says when the client leaves (``watch.on_gone()``)."""

    def __init__(self) -> None:
        self.on_gone: Callable[[], None] | None = None
        self.stopped = False

    def start(self, on_gone: Callable[[], None]) -> None:
        self.on_gone = on_gone

    def stop(self) -> None:
        self.stopped = True
