"""The one interface the ledger writes its slot counts through, and what its operations answer.

The ledger (paddler_sync/ledger/ledger.py) chooses servers on its view of the fleet and does the
arithmetic; a *store* owns what must be exact: taking a slot only if one is free, giving it back,
an agent's reading, removals, quarantines and the waiting queue's tickets. Each operation updates
the ledger's view of the server it touches with the counts the store now holds, so the ledger never
needs to know which store it has:

- ``LocalStore`` (local.py) keeps them in this process (one gunicorn worker): the view is the truth, and
  every operation is a few integer updates, with no I/O and no yielding;
- ``RedisStore`` (redis/store.py) keeps them in Redis for many workers and balancers, each operation one
  atomic Lua script, the view a mirror refreshed from a snapshot.

``tests/live/test_stores.py`` runs one contract over both.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, NamedTuple, Protocol

from paddler_sync.ledger.slots import Claim, Reservation, Ticket, Upstream
from paddler_sync.protocol.models import Serving


class TakeOutcome(IntEnum):
    """What taking a slot came to (the Redis store's take.lua answers these numbers)."""

    TAKEN = 1
    FULL = 0
    GONE = -1  # the server left, or another one has its key now
    UNUSABLE = -2  # not routable, or quarantined
    NOT_YOUR_TURN = -3  # an older request waits (on some worker) first
    TICKET_LOST = -4  # the store forgot the waiter's ticket (Redis restarted empty): it draws a new one
    AT_CAP = -5  # the tenant holds its max_slots already
    RESERVED = -6  # the free slots left are other tenants' reservations


class Take(NamedTuple):
    outcome: TakeOutcome
    lease: str | None = None  # the slot's name in a shared store (it expires unless renewed)


class Snapshot(NamedTuple):
    """A shared store's whole fleet: rows of (key, addr, total, external, routable, quarantined_until, in_flight,
    lingering, sleeping, serving) as text or numbers (serving: :class:`Serving` as JSON), and the agents' records
    (agent id -> JSON)."""

    rows: list[list[Any]]
    records: dict[str, str]


class SlotStore(Protocol):
    overbooks: bool  # it may take a request beyond a server's free slots (early hand-overs); a shared one never does

    def take(self, upstream: Upstream, now: float, ticket: Ticket | None, beyond_slots: bool,
             model: str | None = None, claim: Claim | None = None, pool: tuple[Upstream, ...] = ()) -> Take:
        """``model``: the request's, whose queue's order the take keeps. ``beyond_slots``: it may take a request
        with no slot free (an early hand-over, a slot-blind baseline policy); a shared store never does.
        ``claim``: the tenant asking (--tenants), held to the tenant rule atomically with the take; ``pool``: the
        servers its model may use, over which other tenants' reservations are counted."""
        ...

    def held(self) -> dict[str, int]:
        """Slots each tenant holds now (--tenants)."""
        ...

    def turns(self) -> dict[str, int]:
        """When each tenant last took a slot, as a number that grows with every take (--tenants)."""
        ...

    def release(self, reservation: Reservation, lingering: bool) -> bool:
        """True when the slot was still held (and capacity may have grown)."""
        ...

    def report(self, upstream: Upstream, total: int, processing: int, routable: bool, sleeping: bool,
               now: float, record: str, serving: Serving) -> None: ...

    def remove(self, key: str, reported_before: float | None = None, agent: str | None = None) -> bool:
        """False when ``reported_before`` is given and the server reported after it (a balancer heard from it).
        ``agent``: the agent's record goes too (it left), not only this entry (one of a router's models)."""
        ...

    def quarantine(self, key: str, until: float) -> None: ...

    def take_ticket(self, model: str | None, tenant: str | None = None) -> Ticket | None:
        """A place at the end of the queue of requests for ``model`` (None: requests that name none), in its
        tenant's queue (--tenants)."""
        ...

    def return_ticket(self, ticket: Ticket | None) -> None: ...

    def waiting_changed(self, anyone: bool) -> None: ...

    def check_available(self) -> None:
        """Raises StateUnavailable when no slot can be taken at all (a shared store that is down)."""
        ...

    def snapshot(self) -> Snapshot | None:
        """The whole fleet as the store has it, when other processes change it too (None: only this one does)."""
        ...
