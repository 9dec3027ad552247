"""The slot ledger: how many slots each llama.cpp server has free, right now. The heart of the balancer.

A slot is taken in :meth:`Ledger.reserve` and given back in :meth:`Ledger.give_back` (which names why: see
``GiveBack``); nothing else
changes ``in_flight``. Agent reports (:meth:`Ledger.report`) bring the load this balancer did not
send (another client, another balancer, a request llama.cpp still runs after its client left):

    external = max(0, reported_processing - in_flight_when_sampled)     on each report
    free     = max(0, total - in_flight - external - lingering)

``in_flight_when_sampled`` is ``in_flight`` less the slots taken and plus the slots given back since the
agent read /slots (each server keeps its recent moves): a request that ended between that reading and
the report's arrival is no "external" load, and counting it so would hide a free slot for a whole
reporting interval (measured: a quarter of the slots idle under short requests).

With ``early_lead`` (``--early-dispatch``) a full server may take one request more a moment before one
of its running requests is expected to end (:meth:`Ledger.expect_end`): llama.cpp then starts it in the very
step the slot frees, instead of after the round trip a hand-off through the balancer costs. How many it
holds beyond its slots is derived (``overbooked``), never counted apart, and is at most one.

The ledger itself does no I/O: what must be exact goes through its *store* (paddler_sync/ledger/stores/local.py).
With the in-process store nothing yields to the gevent hub, so each method is atomic without locks and
property tests drive it directly; with the Redis store the same methods keep a mirror that Redis
confirms. Reservations hold the record they were taken from, so a release after the server was
removed (or removed and registered again) changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from paddler_sync.ledger.policy import MostFreeSlots, Policy, Score, preference
from paddler_sync.ledger.slots import Claim, GiveBack, Reservation, Ticket, TicketLost, Upstream, as_of_now
from paddler_sync.ledger.stores.base import SlotStore, TakeOutcome
from paddler_sync.ledger.stores.local import LocalStore
from paddler_sync.protocol.models import ANY, UNLOADED, Serving
from paddler_sync.tenants.rule import Load

WAIT_SAFETY = 2.0  # a full server's foreseen wait counts this many times over: its requests often run late
WAIT_MARGIN_SECONDS = 0.1  # and waiting there must save at least this much more than it costs
WAIT_ON = (TakeOutcome.NOT_YOUR_TURN, TakeOutcome.AT_CAP, TakeOutcome.RESERVED)  # no other server would do better


class Ledger:
    def __init__(self, policy: Policy | None = None, clock: Callable[[], float] = time.time,
                 early_lead: float = 0.0, store: SlotStore | None = None) -> None:
        self.policy: Policy = policy or MostFreeSlots()
        self.clock = clock
        self.early_lead = early_lead  # seconds; 0: a request is only ever sent to a free slot
        self.store: SlotStore = store if store is not None else LocalStore()
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

    def in_flight(self) -> int:
        return sum(u.in_flight for u in self._upstreams.values())

    # --- the waiting queue (a shared store orders it across workers; here the buffer's order is enough) ------

    def take_ticket(self, model: str | None = None, tenant: str | None = None) -> Ticket | None:
        """A place in the shared queue of requests for ``model`` (one queue per model named, and per tenant)."""
        return self.store.take_ticket(model, tenant)

    def held(self) -> dict[str, int]:
        """Slots each tenant holds now (--tenants), as the store has them."""
        return self.store.held()

    def tenant_load(self) -> Load:
        """The tenants' slots held and turns, as the tenant rule ranks them."""
        return Load(self.store.held(), self.store.turns())

    def return_ticket(self, ticket: Ticket | None) -> None:
        """A waiter left without a slot: its place in the shared queue goes."""
        self.store.return_ticket(ticket)

    def waiting_changed(self, anyone: bool) -> None:
        """The buffer has waiters now (or none any more); a shared store tells the other workers."""
        self.store.waiting_changed(anyone)

    def check_available(self) -> None:
        """Raises StateUnavailable when slots cannot be taken at all (a shared store that is down)."""
        self.store.check_available()

    # --- changes from agents ----------------------------------------------------------------------

    def report(self, key: str, addr: str, total: int, processing: int, routable: bool,
               sleeping: bool = False, sampled_at: float | None = None, record: str = "{}",
               serving: Serving = ANY) -> None:
        """``sampled_at``: when the agent read /slots, on this ledger's clock (None: just now). The reading is
        moved on by this worker's own takes and releases since (with a shared store, other workers' are not
        known here: one of theirs that ended meanwhile may hide a slot until the next report). ``record``: the
        agent's record as JSON, kept with it by a shared store for every balancer. ``serving``: its model(s)."""
        upstream = self._view(key, addr)
        processing = max(0, as_of_now(upstream, processing, sampled_at))
        self.store.report(upstream, max(0, total), processing, routable, sleeping, self.clock(), record, serving)
        upstream.routable = routable
        upstream.sleeping = sleeping
        upstream.serving = serving
        if routable:
            upstream.quarantined_until = None
        self._capacity_may_have_grown()

    def _view(self, key: str, addr: str) -> Upstream:
        """The server under ``key``: a new one when the key is new or now names another address."""
        upstream = self._upstreams.get(key)
        if upstream is None or upstream.addr != addr:
            upstream = self._upstreams[key] = Upstream(key=key, addr=addr)
        return upstream

    def remove(self, key: str, agent: str | None = None) -> Upstream | None:
        """``agent``: its agent left, and a shared store forgets the agent's record too."""
        self.store.remove(key, agent=agent)
        return self._upstreams.pop(key, None)

    def remove_if_silent(self, key: str, reported_before: float, agent: str | None = None) -> bool:
        """Remove it unless a balancer (any of them) heard from its agent after ``reported_before``."""
        if not self.store.remove(key, reported_before, agent):
            return False
        self._upstreams.pop(key, None)
        return True

    def forget(self, key: str) -> None:
        """Out of this view only (a shared store that cannot be reached drops it on its own)."""
        self._upstreams.pop(key, None)

    def quarantine(self, key: str, seconds: float) -> float | None:
        upstream = self._upstreams.get(key)
        if upstream is None:
            return None
        upstream.quarantined_until = self.clock() + seconds
        self.store.quarantine(key, upstream.quarantined_until)
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

    def refresh(self) -> dict[str, str] | None:
        """Replace the view with a shared store's snapshot (one round trip) and let waiting requests try again;
        returns the agents' records it holds, for the registry (None: the store is this process's own)."""
        snapshot = self.store.snapshot()
        if snapshot is None:
            return None
        seen = set()
        for key, addr, total, external, routable, quarantined_until, in_flight, lingering, sleeping, serving \
                in snapshot.rows:
            seen.add(key)
            upstream = self._view(key, addr)
            upstream.set_counts(int(total), int(in_flight), int(external), int(lingering))
            upstream.routable = routable == "1"
            upstream.sleeping = sleeping == "1"
            upstream.serving = Serving.from_json(serving)
            upstream.quarantined_until = float(quarantined_until) if quarantined_until else None
        for key in set(self._upstreams) - seen:
            del self._upstreams[key]
        self._capacity_may_have_grown()
        return snapshot.records

    # --- taking and giving back ----------------------------------------------------------------------

    def reserve(self, ticket: Ticket | None = None, model: str | None = None, need: int | None = None,
                one_queue: bool = False, score: Score | None = None, claim: Claim | None = None) \
            -> Reservation | None:
        """Take one slot on the server the policy picks, or None when no server may take a request.
        ``ticket``: the waiter's place in a shared store's queue. ``model``: the (normalized) model the request
        names, None when it names none; ``need``: the context it needs, in tokens, when known; ``one_queue``: the
        buffer keeps one queue for all models (a new arrival keeps that queue's order, not its model's);
        ``score``: the request's expected seconds to its first token on a server (paddler_sync/routing/first_token.py).
        A server the store finds full (another worker took its last slot) or gone is skipped, and the next
        choice tried. ``claim``: the tenant asking (--tenants): the store holds it to the tenant rule."""
        self.check_available()
        now = self.clock()
        queue = None if one_queue else model
        for _ in range(len(self._upstreams) + 1):
            candidates = self.candidates(model, need)
            upstream = self.policy.choose(candidates, now, score)
            worth_waiting = self._worth_waiting_for(candidates, upstream, now, score)
            if worth_waiting is not None:
                taken = self._take(worth_waiting, now, ticket, queue, True, claim, candidates)
                if isinstance(taken, Reservation):
                    return taken
            early = upstream is None and self.early_lead > 0
            if early:
                upstream = self._soonest_to_free(candidates, now)
            if upstream is None:
                return None
            taken = self._take(upstream, now, ticket, queue, early or self.policy.slot_blind, claim, candidates)
            if isinstance(taken, Reservation):
                return taken
            if taken in WAIT_ON or (taken is TakeOutcome.FULL and early):
                return None  # an older (or a more deserving tenant's) request first, or the tenant rule says wait
        return None

    def _take(self, upstream: Upstream, now: float, ticket: Ticket | None, queue: str | None,
              beyond_slots: bool, claim: Claim | None = None, pool: list[Upstream] | None = None) \
            -> Reservation | TakeOutcome:
        """One slot through the store; what did not work is noted in the view (gone, unusable)."""
        take = self.store.take(upstream, now, ticket, beyond_slots, queue, claim, tuple(pool or ()))
        if take.outcome is TakeOutcome.TAKEN:
            upstream.moves.append((now, 1))
            reservation = self._taken(upstream, take.lease, beyond_slots and upstream.overbooked > 0)
            reservation.tenant = claim.tenant if claim is not None else None
            return reservation
        if take.outcome is TakeOutcome.TICKET_LOST:
            raise TicketLost(ticket)
        if take.outcome is TakeOutcome.GONE:
            self._upstreams.pop(upstream.key, None)
        elif take.outcome is TakeOutcome.UNUSABLE:
            upstream.routable = False
        return take.outcome

    def _worth_waiting_for(self, candidates: list[Upstream], chosen: Upstream | None, now: float,
                           score: Score | None) -> Upstream | None:
        """A full server worth a request although another has a free slot: one of its running requests is due
        to end so soon that the request's first token still comes sooner there (its cache holds more of the
        prompt than the wait costs). It then waits inside llama.cpp, one at most per server; with the
        in-process store only (Redis never takes beyond the free slots)."""
        if score is None or chosen is None or not self.records_ends or not self.store.overbooks:
            return None
        best, best_seconds = None, score.prefill_seconds(chosen) - WAIT_MARGIN_SECONDS
        for upstream in candidates:
            if upstream is not chosen and upstream.may_overbook(now):
                wait = max(0.0, min(upstream.ends.values()) - now)
                seconds = WAIT_SAFETY * wait + score.prefill_seconds(upstream)  # ends foreseen are often early
                if seconds < best_seconds:
                    best, best_seconds = upstream, seconds
        return best

    def candidates(self, model: str | None, need: int | None = None) -> list[Upstream]:
        """The entries that may serve a request for ``model`` needing ``need`` tokens of context: those that
        serve the model and hold that much (or do not say). A model loaded (or loading: an unloaded router
        model that a request was sent to loads now) somewhere is served only there; only when it is loaded
        nowhere may a router that can load it get the request."""
        pools = [u for u in self._upstreams.values() if u.serving.serves(model)
                 and (need is None or u.serving.n_ctx is None or u.serving.n_ctx >= need)]
        warm = [u for u in pools if not _cold(u)]
        return warm if warm else [u for u in pools if u.serving.loadable]

    def knows(self, model: str) -> bool:
        """Some entry of the fleet serves this (normalized) model, loaded or not."""
        return any(u.serving.serves(model) for u in self._upstreams.values())

    def has_router(self) -> bool:
        return any(u.serving.needs_model for u in self._upstreams.values())

    def needs_model(self) -> bool:
        """Every entry wants a model named (a fleet of routers): a request without one can go nowhere."""
        return bool(self._upstreams) and all(u.serving.needs_model for u in self._upstreams.values())

    @staticmethod
    def _taken(upstream: Upstream, lease: str | None, early: bool) -> Reservation:
        """A slot taken on an unloaded router model starts its load (counted apart in the metrics)."""
        return Reservation(upstream, lease=lease, early=early, loads_model=upstream.serving.state == UNLOADED)

    def _soonest_to_free(self, candidates: list[Upstream], now: float) -> Upstream | None:
        ready = [u for u in candidates if u.early_room(now, self.early_lead)]
        return min(ready, key=lambda u: min(u.ends.values()), default=None)

    @property
    def records_ends(self) -> bool:
        """Running requests' foreseen ends are kept: for --early-dispatch, and for a policy that weighs a full
        server's wait against another's prefill."""
        return self.early_lead > 0 or self.policy.weighs_waits

    def expect_end(self, reservation: Reservation, at: float) -> None:
        """The request should end at ``at`` (this ledger's clock): a waiting one may go there shortly before."""
        if self.records_ends and not reservation.released and reservation.uses_slot:
            reservation.upstream.ends[reservation] = at
            if self.early_lead > 0:
                self._capacity_may_have_grown()

    def next_early_chance(self) -> float | None:
        """When a waiting request could next be handed over early, if ever (None)."""
        if self.early_lead <= 0:
            return None
        now = self.clock()
        times = [min(u.ends.values()) for u in self._upstreams.values() if u.may_overbook(now)]
        return min(times) - self.early_lead if times else None

    def pick_without_slot(self, model: str | None = None, router: bool = False) -> Reservation | None:
        """Any usable server of ``model``, for requests that run no llama.cpp task (health, props, tokenize...). One
        that names no model may go to a router too: a router answers those itself. ``router``: a router's own
        business (loading, unloading, deleting, downloading its models): a router, whatever model it names."""
        now = self.clock()
        if router:
            routers = [u for u in self._upstreams.values() if u.serving.needs_model and u.is_usable(now)]
            if routers:
                return Reservation(min(routers, key=lambda u: preference(u, now)), uses_slot=False)
        usable = [u for u in self.candidates(model) if u.is_usable(now)]
        if not usable and model is None:
            usable = [u for u in self._upstreams.values() if u.is_usable(now)]
        if not usable:
            return None
        return Reservation(min(usable, key=lambda u: preference(u, now)), uses_slot=False)

    def give_back(self, reservation: Reservation, why: GiveBack = GiveBack.ANSWERED) -> bool:
        """Give the slot back (idempotent); the one way a slot goes back. ``why`` names the path; where llama.cpp
        may still run the slot (``why.may_still_run``), it stays counted busy ("lingering") until the next report
        shows it free."""
        lingering = why.may_still_run and reservation.uses_slot
        if reservation.released:
            return False
        reservation.released = True
        upstream = reservation.upstream
        upstream.ends.pop(reservation, None)
        if not reservation.uses_slot:
            return False
        if not lingering:
            upstream.moves.append((self.clock(), -1))
        released = self.store.release(reservation, lingering)
        if released or reservation.tenant is not None:  # a tenant at its cap may take another now
            self._capacity_may_have_grown()
        return released

    # --- listeners -----------------------------------------------------------------------------------

    def on_capacity(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever a slot may have become free (the request buffer dispatches then)."""
        self._capacity_listeners.append(listener)

    def _capacity_may_have_grown(self) -> None:
        for listener in self._capacity_listeners:
            listener()


def _cold(upstream: Upstream) -> bool:
    """An unloaded router model that no request was sent to: loading it costs seconds."""
    return upstream.serving.state == UNLOADED and upstream.in_flight + upstream.external == 0
