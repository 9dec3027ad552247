"""The slot ledger: how many slots each llama.cpp server has free, right now. The heart of the balancer.

A slot is taken in :meth:`Ledger.reserve` and given back in :meth:`Ledger.release`; nothing else
changes ``in_flight``. Agent reports (:meth:`Ledger.report`) bring the load this balancer did not
send (another client, another balancer, a request llama.cpp still runs after its client left):

    external = max(0, reported_processing - in_flight_when_sampled)     on each report
    free     = max(0, total - in_flight - external - draining)

``in_flight_when_sampled`` is ``in_flight`` less the slots taken and plus the slots given back since the
agent read /slots (each server keeps its recent moves): a request that ended between that reading and
the report's arrival is no "external" load, and counting it so would hide a free slot for a whole
reporting interval (measured: a quarter of the slots idle under short requests).

With ``early_lead`` (``--early-dispatch``) a full server may take one request more a moment before one
of its running requests is expected to end (:meth:`Ledger.expect_end`): llama.cpp then starts it in the very
step the slot frees, instead of after the round trip a hand-off through the balancer costs. How many it
holds beyond its slots is derived (``overbooked``), never counted apart, and is at most one.

The ledger does no I/O and never yields to the gevent hub, so each method is atomic without locks
and property tests drive it directly. Reservations hold the record they were taken from, so a
release after the server was removed (or removed and registered again) changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from paddler_sync.fleet.policy import MostFreeSlots, Policy, preference
from paddler_sync.fleet.upstream import Reservation, Ticket, Upstream, as_of_now


class Ledger:
    def __init__(self, policy: Policy | None = None, clock: Callable[[], float] = time.time,
                 early_lead: float = 0.0) -> None:
        self.policy: Policy = policy or MostFreeSlots()
        self.clock = clock
        self.early_lead = early_lead  # seconds; 0: a request is only ever sent to a free slot
        self._upstreams: dict[str, Upstream] = {}
        self._capacity_listeners: list[Callable[[], None]] = []

    # --- reading ----------------------------------------------------------------------------------

    def get(self, key: str) -> Upstream | None:
        return self._upstreams.get(key)

    def upstreams(self) -> Iterable[Upstream]:
        return self._upstreams.values()

    def free_slots(self) -> int:
        now = self.clock()
        return sum(u.free(now) for u in self._upstreams.values())

    def take_ticket(self) -> Ticket | None:
        """A place in the queue shared by every worker (a shared ledger); None here: the buffer's order is enough."""
        return None

    def return_ticket(self, ticket: Ticket | None) -> None:
        """A waiter left without a slot: its place in the shared queue goes."""

    def waiting_changed(self, anyone: bool) -> None:
        """The buffer has waiters now (or none any more); a shared ledger tells the other workers."""

    def check_available(self) -> None:
        """Raises StateUnavailable when slots cannot be taken at all (a shared ledger that is down)."""

    def in_flight(self) -> int:
        return sum(u.in_flight for u in self._upstreams.values())

    # --- changes from agents ----------------------------------------------------------------------

    def report(self, key: str, addr: str, total: int, processing: int, routable: bool,
               sleeping: bool = False, sampled_at: float | None = None) -> None:
        """``sampled_at``: when the agent read /slots, on this ledger's clock (None: just now)."""
        upstream = self._upstreams.get(key)
        if upstream is None or upstream.addr != addr:
            upstream = self._upstreams[key] = Upstream(key=key, addr=addr)
        upstream.total = max(0, total)
        processing = as_of_now(upstream, processing, sampled_at)
        upstream.external = max(0, processing - upstream.in_flight)
        upstream.draining = 0
        upstream.routable = routable
        upstream.sleeping = sleeping
        if routable:
            upstream.quarantined_until = None
        self._capacity_may_have_grown()

    def remove(self, key: str) -> Upstream | None:
        return self._upstreams.pop(key, None)

    def quarantine(self, key: str, seconds: float) -> float | None:
        upstream = self._upstreams.get(key)
        if upstream is None:
            return None
        upstream.quarantined_until = self.clock() + seconds
        return upstream.quarantined_until

    def lift_expired_quarantines(self) -> list[str]:
        now = self.clock()
        lifted = [u.key for u in self._upstreams.values()
                  if u.quarantined_until is not None and now >= u.quarantined_until]
        for key in lifted:
            self._upstreams[key].quarantined_until = None
        if lifted:
            self._capacity_may_have_grown()
        return lifted

    # --- taking and giving back ----------------------------------------------------------------------

    def reserve(self, ticket: Ticket | None = None) -> Reservation | None:
        """Take one slot on the server the policy picks, or None when no server may take a request.
        ``ticket``: the waiter's place in a shared ledger's queue (this one has a single queue: the buffer's)."""
        now = self.clock()
        upstream = self.policy.choose(list(self._upstreams.values()), now)
        early = upstream is None and self.early_lead > 0
        if early:
            upstream = self._soonest_to_free(now)
        if upstream is None:
            return None
        upstream.in_flight += 1
        upstream.moves.append((now, 1))
        return Reservation(upstream, early=early)

    def _soonest_to_free(self, now: float) -> Upstream | None:
        ready = [u for u in self._upstreams.values() if u.early_room(now, self.early_lead)]
        return min(ready, key=lambda u: min(u.ends.values()), default=None)

    def expect_end(self, reservation: Reservation, at: float) -> None:
        """The request should end at ``at`` (this ledger's clock): a waiting one may go there shortly before."""
        if self.early_lead > 0 and not reservation.released and reservation.uses_slot:
            reservation.upstream.ends[reservation] = at
            self._capacity_may_have_grown()

    def next_early_chance(self) -> float | None:
        """When a waiting request could next be handed over early, if ever (None)."""
        if self.early_lead <= 0:
            return None
        now = self.clock()
        times = [min(u.ends.values()) for u in self._upstreams.values() if u.may_overbook(now)]
        return min(times) - self.early_lead if times else None

    def pick_without_slot(self) -> Reservation | None:
        """Any usable server, for requests that run no llama.cpp task (health, models, tokenize...)."""
        now = self.clock()
        usable = [u for u in self._upstreams.values() if u.is_usable(now)]
        if not usable:
            return None
        return Reservation(min(usable, key=lambda u: preference(u, now)), uses_slot=False)

    def release(self, reservation: Reservation, draining: bool = False) -> bool:
        """Give the slot back (idempotent). ``draining``: llama.cpp may still run it (client left a
        non-streaming request), so keep the slot counted busy until the next report shows it."""
        if reservation.released:
            return False
        reservation.released = True
        upstream = reservation.upstream
        upstream.ends.pop(reservation, None)
        if not reservation.uses_slot or self._upstreams.get(upstream.key) is not upstream:
            return False
        upstream.in_flight -= 1
        if draining:  # still running in llama.cpp: the next reading shows it, and must count it as external
            upstream.draining += 1
        else:
            upstream.moves.append((self.clock(), -1))
        self._capacity_may_have_grown()
        return True

    # --- listeners -----------------------------------------------------------------------------------

    def on_capacity(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a slot may have become free (the request buffer dispatches then)."""
        self._capacity_listeners.append(listener)

    def _capacity_may_have_grown(self) -> None:
        for listener in self._capacity_listeners:
            listener()

