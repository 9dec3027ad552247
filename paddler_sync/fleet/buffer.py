"""The request buffer: requests that found no free slot wait here, in arrival order, never in llama.cpp.

When a slot frees (a release, a report, a lifted quarantine, a message from another worker through
the shared ledger) the ledger calls :meth:`dispatch`,
which hands reservations straight to the oldest waiters that can use them, one slot to one waiter:
no thundering herd, and a new arrival never overtakes a waiter. A waiter that times out, or whose
client leaves, takes itself out of the queue and takes nothing with it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
from gevent.event import AsyncResult

from paddler_sync.endings import Ending
from paddler_sync.fleet.ledger import Ledger
from paddler_sync.fleet.upstream import Reservation, Ticket, TicketLost


class Watch(Protocol):
    """Tells the buffer when a waiting request's client has left (see paddler_sync.sockets.ClientWatch)."""

    def start(self, on_gone: Callable[[], None]) -> None: ...

    def stop(self) -> None: ...


class BufferRefusal(Exception):
    """The request gets no slot; ``status`` and the message say what to answer, ``ending`` names it in the
    access log and metrics, and ``waited`` is how long it waited first (a timeout waited longest of all)."""

    status = 503
    ending = Ending.REFUSED
    waited = 0.0


class BufferFull(BufferRefusal):
    status = 429
    ending = Ending.QUEUE_FULL


class BufferTimeout(BufferRefusal):
    status = 504
    ending = Ending.TIMED_OUT


class BufferClosed(BufferRefusal):
    status = 503
    ending = Ending.SHUTTING_DOWN


class StateUnavailable(BufferRefusal):
    """The shared slot ledger (Redis) cannot be reached: fail closed, the client may retry."""

    status = 503
    ending = Ending.STATE_UNAVAILABLE


class ClientGone(BufferRefusal):
    status = 499
    ending = Ending.CLIENT_GONE


@dataclass(eq=False)
class Waiter:
    since: float = field(default_factory=time.monotonic)
    result: AsyncResult = field(default_factory=AsyncResult)
    ticket: Ticket | None = None  # its place in a shared ledger's queue (None with the in-process ledger)


class RequestBuffer:
    def __init__(self, ledger: Ledger, max_waiting: int, timeout: float) -> None:
        self.ledger = ledger
        self.max_waiting = max_waiting
        self.timeout = timeout
        self._waiters: deque[Waiter] = deque()
        self._closed_reason: str | None = None
        self._dispatching = False
        self._dispatch_again = False
        self._early_timer: Any = None  # gevent's timer; wakes the buffer when a request may be handed over early
        self._early_at = float("inf")
        ledger.on_capacity(self.dispatch)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def oldest_wait(self) -> float:
        return time.monotonic() - self._waiters[0].since if self._waiters else 0.0

    def acquire(self, client: Watch | None = None) -> tuple[Reservation, float]:
        """A reservation and how long it waited; raises a BufferRefusal when there is none to give."""
        if self._closed_reason:
            raise BufferClosed(self._closed_reason)
        self.ledger.check_available()
        if not self._waiters:
            reservation = self.ledger.reserve()
            if reservation is not None:
                return reservation, 0.0
        if len(self._waiters) >= self.max_waiting:
            raise BufferFull(self._full_message())
        return self._wait(Waiter(), client)

    def dispatch(self) -> None:
        """Hand free slots to the oldest waiters, one slot each, in arrival order.

        One dispatch at a time: a shared ledger yields while Redis answers, and two dispatches serving
        the same head could both redraw its ticket and orphan one. A wake-up meanwhile runs another round."""
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            self._dispatch_again = True
            while self._dispatch_again:
                self._dispatch_again = False
                self._dispatch_round()
        finally:
            self._dispatching = False

    def _dispatch_round(self) -> None:
        while self._waiters:
            head = self._waiters[0]
            if head.result.ready():  # its client left; its place goes back here or in its greenlet, once
                self._waiters.popleft()
                self.ledger.return_ticket(head.ticket)
                self._announce_if_empty()
                continue
            try:
                reservation = self.ledger.reserve(ticket=head.ticket)
            except StateUnavailable:
                return  # the waiters keep waiting; the shared ledger's refresh tries again
            except TicketLost:
                if not self._redraw_ticket(head):
                    return
                continue
            if reservation is None:
                self._wake_for_early_hand_over()
                return
            if head not in self._waiters:  # it left while a shared ledger answered: the slot goes back
                self.ledger.release(reservation)
                continue
            self._waiters.remove(head)
            head.result.set(reservation)
            self._announce_if_empty()

    def _wake_for_early_hand_over(self) -> None:
        """One timer for the soonest moment a running request is due to end (--early-dispatch)."""
        at = self.ledger.next_early_chance()
        if at is None or at >= self._early_at:
            return
        if self._early_timer is not None:
            self._early_timer.close()
        self._early_at = at
        self._early_timer = gevent.get_hub().loop.timer(max(0.0, at - self.ledger.clock()))
        self._early_timer.start(self._early_timer_fired)

    def _early_timer_fired(self) -> None:
        self._early_at = float("inf")
        self._early_timer = None
        self.dispatch()

    def close(self, reason: str) -> None:
        """Refuse new requests and send every waiter away (shutdown)."""
        self._closed_reason = reason
        while self._waiters:
            waiter = self._waiters.popleft()
            self.ledger.return_ticket(waiter.ticket)
            waiter.result.set_exception(BufferClosed(reason))
        self._announce_if_empty()

    def _wait(self, waiter: Waiter, client: Watch | None) -> tuple[Reservation, float]:
        """Sleep until handed a slot, timed out, or the client leaves; no polling while asleep."""
        waiter.ticket = self.ledger.take_ticket()
        self._enqueue(waiter)
        if len(self._waiters) == 1:
            self.ledger.waiting_changed(True)
            self._wake_for_early_hand_over()
        if client is not None:
            client.start(lambda: self._client_left(waiter))
        try:
            reservation = waiter.result.get(timeout=self.timeout)
        except gevent.Timeout:
            self._forget(waiter)
            timeout = BufferTimeout(f"no llama.cpp slot became free within {self.timeout:g}s "
                                    f"(--buffered-request-timeout); retry later or add servers")
            timeout.waited = time.monotonic() - waiter.since
            raise timeout from None
        except BufferRefusal as refusal:
            self._forget(waiter)
            refusal.waited = time.monotonic() - waiter.since
            raise
        except BaseException:
            self._forget(waiter)
            raise
        finally:
            if client is not None:
                client.stop()
        return reservation, time.monotonic() - waiter.since

    def _client_left(self, waiter: Waiter) -> None:
        """Runs in an event-loop callback, where nothing may block (a shared ledger's Redis call would fail
        there): it only wakes the waiter, whose own greenlet gives its place back (``_forget``)."""
        if waiter in self._waiters and not waiter.result.ready():
            waiter.result.set_exception(ClientGone("the client left while waiting"))

    def _forget(self, waiter: Waiter) -> None:
        """A waiter leaving for any reason: out of the queue, and any slot it was handed goes back."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            self.ledger.return_ticket(waiter.ticket)
            self._announce_if_empty()
        elif waiter.result.successful():
            self.ledger.release(waiter.result.value)

    def _redraw_ticket(self, waiter: Waiter) -> bool:
        """A new place at the end of the shared queue for a waiter whose ticket was lost."""
        try:
            ticket = self.ledger.take_ticket()
        except StateUnavailable:
            return False
        if waiter in self._waiters:  # it may have left while Redis answered
            self._waiters.remove(waiter)
            waiter.ticket = ticket
            self._enqueue(waiter)
        else:
            self.ledger.return_ticket(ticket)
        return True

    def _enqueue(self, waiter: Waiter) -> None:
        """Append, in ticket order: two arrivals may get their shared tickets back in either order, and the
        local head must hold this worker's oldest ticket, or the shared queue would wait on it forever."""
        self._waiters.append(waiter)
        if waiter.ticket is None:
            return
        index = len(self._waiters) - 1
        while index > 0 and (before := self._waiters[index - 1].ticket) is not None \
                and before.number > waiter.ticket.number:
            index -= 1
        if index != len(self._waiters) - 1:
            self._waiters.pop()
            self._waiters.insert(index, waiter)

    def _announce_if_empty(self) -> None:
        if not self._waiters:
            self.ledger.waiting_changed(False)

    def _full_message(self) -> str:
        if self.max_waiting == 0:
            return "every llama.cpp slot is busy and buffering is off (--max-buffered-requests 0); retry later"
        return (f"every llama.cpp slot is busy and {self.max_waiting} requests already wait "
                f"(--max-buffered-requests); retry later")
