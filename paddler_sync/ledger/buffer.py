"""The request buffer: requests that found no free slot wait here, in arrival order, never in llama.cpp.

One FIFO queue per model named (and one for requests that name none): a burst for one model never
delays a request for another while that model's servers have room. When a slot frees (a release, a
report, a lifted quarantine, a message from another worker through the shared ledger) the ledger
calls :meth:`dispatch`, which hands reservations straight to the heads of the queues that can use
them, oldest head first, one slot to one waiter: no thundering herd, and a new arrival never overtakes
a waiter for its model. A waiter that times out, or whose client leaves, takes itself out of its queue
and takes nothing with it. ``per_model=False`` keeps one queue for all (the benchmark's baseline).

With tenants (``--tenants``) each model's queue is one FIFO queue per tenant, and the heads are served in the
tenant rule's order (paddler_sync/tenants/rule.py: priority, then fewest slots held per unit of weight, then the
oldest); a new arrival that finds its model's queues non-empty joins them, and a dispatch decides at once whether
it goes before the others. The store holds every take to the rule (its cap, the others' reservations).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
from gevent.event import AsyncResult

from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.policy import Score
from paddler_sync.ledger.refusals import (
    BufferClosed,
    BufferFull,
    BufferRefusal,
    BufferTimeout,
    ClientGone,
    StateUnavailable,
)
from paddler_sync.ledger.slots import Claim, GiveBack, Reservation, Ticket, TicketLost
from paddler_sync.tenants.rule import Load, rank

DRAIN_WINDOW = 60.0  # seconds of served waiters the drain rate is measured over
DRAIN_SAMPLES = 4096


class Watch(Protocol):
    """Tells the buffer when a waiting request's client has left (see paddler_sync.sockets.ClientWatch)."""

    def start(self, on_gone: Callable[[], None]) -> None: ...

    def stop(self) -> None: ...


@dataclass(eq=False)
class Waiter:
    model: str | None = None  # the (normalized) model it asks for
    need: int | None = None  # the context it needs, in tokens, when known
    queue: str | None = None  # the queue it stands in: its model's, or the one for all
    score: Score | None = None  # its first-token estimate per server (--policy first-token)
    since: float = field(default_factory=time.monotonic)
    result: AsyncResult = field(default_factory=AsyncResult)
    ticket: Ticket | None = None  # its place in a shared ledger's queue (None with the in-process ledger)
    claim: Claim | None = None  # its tenant (--tenants)
    needs_ticket: bool = False  # it came while the shared ledger was away, and has no place in its queue yet

    @property
    def tenant(self) -> str | None:
        return self.claim.tenant if self.claim is not None else None

    @property
    def key(self) -> QueueKey:
        """Its queue: its model's (or the one for all), and its tenant's within it."""
        return self.queue, self.tenant


QueueKey = tuple[str | None, str | None]


class RequestBuffer:
    def __init__(self, ledger: Ledger, max_waiting: int, timeout: float, per_model: bool = True) -> None:
        self.ledger = ledger
        self.max_waiting = max_waiting
        self.timeout = timeout
        self.per_model = per_model
        self._queues: dict[QueueKey, deque[Waiter]] = {}
        self._count = 0
        self._served_at: deque[float] = deque(maxlen=DRAIN_SAMPLES)  # when waiters got their slots, newest last
        self._closed_reason: str | None = None
        self._refusal: type[BufferClosed] = BufferClosed
        self._dispatching = False
        self._dispatch_again = False
        self._early_timer: Any = None  # gevent's timer; wakes the buffer when a request may be handed over early
        self._early_at = float("inf")
        ledger.on_capacity(self.dispatch)

    @property
    def waiting(self) -> int:
        return self._count

    def waiting_by_model(self) -> dict[str | None, int]:
        counts: dict[str | None, int] = {}
        for queue in self._queues.values():
            for waiter in queue:
                counts[waiter.model] = counts.get(waiter.model, 0) + 1
        return counts

    def waiting_by_tenant(self) -> dict[str, int]:
        return {tenant: sum(len(q) for (_, t), q in self._queues.items() if t == tenant)
                for tenant in {t for _, t in self._queues if t is not None}}

    def drain_rate(self, now: float | None = None) -> float | None:
        """Waiters served per second over the last minute (None: too few to say)."""
        now = time.monotonic() if now is None else now
        recent = [at for at in self._served_at if at > now - DRAIN_WINDOW]
        if len(recent) < 2:
            return None
        return len(recent) / max(now - recent[0], 1.0)

    def expected_wait(self, position: int, now: float | None = None) -> float | None:
        """How long the ``position``-th waiter should wait, at the measured drain rate (None: unknown)."""
        rate = self.drain_rate(now)
        return position / rate if rate else None

    def position(self, queue: str | None, arrived: float) -> int:
        """A waiter's place in its queue (1: next), by its arrival (``time.monotonic()`` before it asked)."""
        return 1 + sum(1 for (model, _), waiters in self._queues.items() if model == queue
                       for waiter in waiters if waiter.since < arrived)

    def oldest_wait(self) -> float:
        heads = [queue[0].since for queue in self._queues.values() if queue]
        return time.monotonic() - min(heads) if heads else 0.0

    def acquire(self, client: Watch | None = None, model: str | None = None, need: int | None = None,
                timeout: float | None = None, score: Score | None = None,
                claim: Claim | None = None) -> tuple[Reservation, float]:
        """A reservation and how long it waited; raises a BufferRefusal when there is none to give.
        ``model``: the normalized model the request names (None: none); ``need``: its context in tokens;
        ``timeout``: a shorter wait than the buffer's; ``score``: its first-token estimate per server;
        ``claim``: its tenant (--tenants)."""
        if self._closed_reason:
            raise self._refusal(self._closed_reason)
        waiter = Waiter(model, need, model if self.per_model else None, score, claim=claim)
        others_wait = self._has_waiters(waiter.queue)
        if not others_wait:
            reservation = self._reserve_now(waiter)
            if reservation is not None:
                return reservation, 0.0
        if self._waiting_as(waiter) >= self.max_waiting:
            raise BufferFull(self._full_message(waiter.tenant))
        timeout = self.timeout if timeout is None else min(timeout, self.timeout)
        return self._wait(waiter, client, timeout, rank_now=others_wait and claim is not None)

    def _reserve_now(self, waiter: Waiter) -> Reservation | None:
        """A slot for an arrival nobody waits before; None when there is none now, or the shared ledger cannot be
        reached (then it waits, as for a slot: a Redis failover costs a wait, not a refusal)."""
        try:
            self.ledger.check_available()
            return self.ledger.reserve(None, waiter.model, waiter.need, not self.per_model, waiter.score,
                                       waiter.claim)
        except StateUnavailable:
            return None

    def _waiting_as(self, waiter: Waiter) -> int:
        """The requests waiting that count against its room: all of them, or with tenants its tenant's (one
        tenant's flood must not leave no room for the others)."""
        if waiter.tenant is None:
            return self._count
        return sum(len(queue) for (_, tenant), queue in self._queues.items() if tenant == waiter.tenant)

    def _has_waiters(self, queue: str | None) -> bool:
        return any(model == queue for model, _ in self._queues)

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
        """Serve the queues' heads, oldest first, until every queue is empty or finds no slot."""
        blocked: set[QueueKey] = set()
        while True:
            heads = [queue[0] for key, queue in self._queues.items() if key not in blocked]
            if not heads:
                break
            load = self.ledger.tenant_load() if heads[0].claim is not None else Load()
            head = min(heads, key=lambda waiter: _order(waiter, load))
            served = self._serve(head)
            if served is None:
                return  # the shared ledger is unreachable: the waiters keep waiting; its refresh tries again
            if not served:
                blocked.add(head.key)
        if blocked:
            self._wake_for_early_hand_over()

    def _serve(self, head: Waiter) -> bool | None:
        """Hand the head of its queue a slot: True when the queue moved on, False when its model has no slot
        free (or its tenant must wait), None when the shared ledger cannot be reached."""
        if head.result.ready():  # its client left; its place goes back here or in its greenlet, once
            self._remove(head)
            self.ledger.return_ticket(head.ticket)
            return True
        if head.needs_ticket:  # it came while the shared ledger was away: its place in the shared queue now
            return True if self._redraw_ticket(head) else None
        try:
            reservation = self.ledger.reserve(head.ticket, head.model, head.need, not self.per_model, head.score,
                                              head.claim)
        except StateUnavailable:
            return None
        except TicketLost:
            return True if self._redraw_ticket(head) else None
        if reservation is None:
            return False
        if not self._remove(head):  # it left while a shared ledger answered: the slot goes back
            self.ledger.give_back(reservation, GiveBack.WAITER_LEFT)
            return True
        head.result.set(reservation)
        self._served_at.append(time.monotonic())
        return True

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

    def close(self, reason: str, refusal: type[BufferClosed] = BufferClosed) -> None:
        """Refuse new requests and send every waiter away (shutdown); ``HandedOver``: to the next workers."""
        self._closed_reason = reason
        self._refusal = refusal
        for queue in list(self._queues.values()):
            for waiter in list(queue):
                self._remove(waiter)
                self.ledger.return_ticket(waiter.ticket)
                waiter.result.set_exception(refusal(reason))

    def _wait(self, waiter: Waiter, client: Watch | None, timeout: float,
              rank_now: bool = False) -> tuple[Reservation, float]:
        """Sleep until handed a slot, timed out, or the client leaves; no polling while asleep. ``rank_now``: a
        tenant's request joined others that wait: a dispatch says at once whether it goes before them."""
        try:
            waiter.ticket = self.ledger.take_ticket(waiter.queue, waiter.tenant)
        except StateUnavailable:
            waiter.needs_ticket = True  # it waits all the same; it draws one when the ledger is back
        self._enqueue(waiter)
        if self._count == 1:
            self.ledger.waiting_changed(True)
            self._wake_for_early_hand_over()
        if rank_now:
            self.dispatch()
        if client is not None:
            client.start(lambda: self._client_left(waiter))
        try:
            reservation = waiter.result.get(timeout=timeout)
        except gevent.Timeout:
            self._forget(waiter)
            refusal = self._timed_out(timeout)
            refusal.waited = time.monotonic() - waiter.since
            raise refusal from None
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

    def _timed_out(self, timeout: float) -> BufferRefusal:
        """504, or 503 when the shared ledger is what stayed away all that time."""
        try:
            self.ledger.check_available()
        except StateUnavailable as unavailable:
            return unavailable
        return BufferTimeout(f"no llama.cpp slot became free within {timeout:g}s (--buffered-request-timeout); "
                             f"retry later or add servers")

    def _client_left(self, waiter: Waiter) -> None:
        """Runs in an event-loop callback, where nothing may block (a shared ledger's Redis call would fail
        there): it only wakes the waiter, whose own greenlet gives its place back (``_forget``)."""
        if self._holds(waiter) and not waiter.result.ready():
            waiter.result.set_exception(ClientGone("the client left while waiting"))

    def _forget(self, waiter: Waiter) -> None:
        """A waiter leaving for any reason: out of the queue, and any slot it was handed goes back."""
        if self._remove(waiter):
            self.ledger.return_ticket(waiter.ticket)
        elif waiter.result.successful():
            self.ledger.give_back(waiter.result.value, GiveBack.WAITER_LEFT)

    def _redraw_ticket(self, waiter: Waiter) -> bool:
        """A new place at the end of the shared queue for a waiter whose ticket was lost."""
        try:
            ticket = self.ledger.take_ticket(waiter.queue, waiter.tenant)
        except StateUnavailable:
            return False
        waiter.needs_ticket = False
        if self._holds(waiter):  # it may have left while Redis answered
            self._queues[waiter.key].remove(waiter)
            waiter.ticket = ticket
            self._queues[waiter.key].append(waiter)
            self._order_by_ticket(self._queues[waiter.key])
        else:
            self.ledger.return_ticket(ticket)
        return True

    def _enqueue(self, waiter: Waiter) -> None:
        queue = self._queues.setdefault(waiter.key, deque())
        queue.append(waiter)
        self._count += 1
        self._order_by_ticket(queue)

    @staticmethod
    def _order_by_ticket(queue: deque[Waiter]) -> None:
        """Keep its last waiter in ticket order: two arrivals may get their shared tickets back in either order,
        and the local head must hold this worker's oldest ticket, or the shared queue would wait on it forever."""
        waiter = queue[-1]
        if waiter.ticket is None:
            return
        index = len(queue) - 1
        while index > 0 and (before := queue[index - 1].ticket) is not None and before.number > waiter.ticket.number:
            index -= 1
        if index != len(queue) - 1:
            queue.pop()
            queue.insert(index, waiter)

    def _holds(self, waiter: Waiter) -> bool:
        queue = self._queues.get(waiter.key)
        return queue is not None and waiter in queue

    def _remove(self, waiter: Waiter) -> bool:
        """Out of its queue (an empty queue goes); False when it was not in it."""
        queue = self._queues.get(waiter.key)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        self._count -= 1
        if not queue:
            del self._queues[waiter.key]
        if not self._count:
            self.ledger.waiting_changed(False)
        return True

    def _full_message(self, tenant: str | None = None) -> str:
        if self.max_waiting == 0:
            return "every llama.cpp slot is busy and buffering is off (--max-buffered-requests 0); retry later"
        whose = f" of tenant {tenant!r}" if tenant is not None else ""
        return (f"every llama.cpp slot is busy and {self.max_waiting} requests{whose} already wait "
                f"(--max-buffered-requests{', per tenant' if whose else ''}); retry later")


def _order(waiter: Waiter, load: Load) -> tuple[int, float, int, float]:
    """Which head goes first: the tenant rule's rank (none without tenants), then the oldest."""
    if waiter.claim is None:
        return 0, 0.0, 0, waiter.since
    return (*rank(waiter.claim.share, load), waiter.since)
