"""What the ledger keeps per llama.cpp server, and what a request holds while it has a slot: plain records.

Below the ledger and the policy, which both read them; nothing here does I/O or knows who changes it
(the ledger does, and only it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from paddler_sync.protocol.models import ANY, Serving
from paddler_sync.tenants.rule import Share

MOVES_KEPT = 1024  # a server's recent takes and releases: seconds of them at any realistic rate


@dataclass(eq=False)
class Upstream:
    key: str
    addr: str
    total: int = 0
    in_flight: int = 0
    external: int = 0
    lingering: int = 0  # slots given back that llama.cpp may still run (until a report shows them free)
    routable: bool = False
    quarantined_until: float | None = None
    sleeping: bool = False  # its model is unloaded: it serves, but its first request pays the reload
    serving: Serving = ANY  # the model(s) it serves, and whether loaded (paddler_sync/protocol/models.py)
    moves: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=MOVES_KEPT), repr=False)
    ends: dict[Reservation, float] = field(default_factory=dict, repr=False)  # when running requests should end

    @property
    def overbooked(self) -> int:
        """Requests sent here beyond its slots (handed over early): they wait inside llama.cpp."""
        return max(0, self.in_flight + self.external + self.lingering - self.total)

    def may_overbook(self, now: float) -> bool:
        """Usable and full, nothing waiting inside it yet, and a running request whose end is foreseen."""
        return (bool(self.ends) and self.is_usable(now) and self.total > 0 and self.free(now) == 0
                and self.overbooked == 0)

    def early_room(self, now: float, lead: float) -> bool:
        """It may take one request more now: a running one is due to end within ``lead``."""
        return self.may_overbook(now) and min(self.ends.values()) <= now + lead

    def moved_since(self, since: float) -> int:
        """Slots this balancer took (+1) and gave back (-1) here after ``since``."""
        return sum(step for at, step in reversed(self.moves) if at > since)

    def is_quarantined(self, now: float) -> bool:
        return self.quarantined_until is not None and now < self.quarantined_until

    def is_usable(self, now: float) -> bool:
        return self.routable and not self.is_quarantined(now)

    def free(self, now: float) -> int:
        if not self.is_usable(now):
            return 0
        return max(0, self.total - self.in_flight - self.external - self.lingering)

    def set_counts(self, total: int, in_flight: int, external: int, lingering: int) -> None:
        """The counts a shared store holds for it (the view mirrors them)."""
        self.total, self.in_flight, self.external, self.lingering = total, in_flight, external, lingering

    @property
    def busy(self) -> int:
        """Slots the balancer believes are busy, capped at the total (for display and gauges)."""
        return min(self.total, self.in_flight + self.external + self.lingering)


class GiveBack(StrEnum):
    """Why a slot goes back: every path that gives one back names itself to ``Ledger.give_back``, the one way.

    ANSWERED       Relay.close: the answer ended whole
    BROKE_OFF      Relay.close: llama.cpp broke off its answer; it may still run the slot (lingering)
    CLIENT_LEFT    ProxyApp._connect (before any answer) and Relay.close (mid-answer): the client left; the upstream
                   call is cut at once, but llama.cpp notices only when it next writes (a stream's next token) or
                   within about a second (a non-streaming request): lingering until a report shows the slot free,
                   or a request given the slot meanwhile would wait inside llama.cpp
    REFUSED        ProxyApp._connect: llama.cpp refused the connection: nothing runs there; the request goes to
                   another server (a slot of its own)
    NOT_ANSWERED   ProxyApp._connect and Relay._send_again: the request went out but its answer failed before any
                   byte reached the client (a read timeout, a broken connection); llama.cpp may still run it
                   (lingering); the request goes to another server or fails
    WAITER_LEFT    RequestBuffer and QueuedStream: a slot handed to a waiter at the moment its client left
    """

    ANSWERED = "answered"
    BROKE_OFF = "broke_off"
    CLIENT_LEFT = "client_left"
    REFUSED = "refused"
    NOT_ANSWERED = "not_answered"
    WAITER_LEFT = "waiter_left"

    @property
    def may_still_run(self) -> bool:
        """llama.cpp may still be generating in the slot: it stays counted busy until the next report."""
        return self in (GiveBack.BROKE_OFF, GiveBack.CLIENT_LEFT, GiveBack.NOT_ANSWERED)


class TicketLost(Exception):
    """A shared queue forgot this waiter's place (Redis restarted empty): it draws a new one.
    Never re-added by the waiter itself: a ticket put back while it is being returned would stay forever."""


class Claim(NamedTuple):
    """A tenant's request asking for a slot: what the tenant rule weighs (paddler_sync/tenants/rule.py).
    ``rivals``: every tenant that may use the servers of the request's model, the asking one included."""

    share: Share
    rivals: tuple[Share, ...] = ()

    @property
    def tenant(self) -> str:
        return self.share.name


class Ticket(NamedTuple):
    """A waiting request's place in a shared ledger's queue: ``number`` orders it, ``name`` names it in Redis,
    ``queue`` is the queue it stands in (one per model named; '' for requests that name none)."""

    number: int
    name: str
    queue: str = ""


@dataclass(eq=False)
class Reservation:
    """One request's claim on a server; ``uses_slot`` is False for requests that need no slot."""

    upstream: Upstream
    uses_slot: bool = True
    released: bool = False
    lease: str | None = None  # its name in the shared ledger (Redis), which lets it expire
    early: bool = False  # handed over before a slot was free (it waits inside llama.cpp until one is)
    loads_model: bool = False  # sent to a router whose model was unloaded: llama.cpp loads it first
    tenant: str | None = None  # whose slot it is (--tenants), counted against that tenant until released

    @property
    def addr(self) -> str:
        return self.upstream.addr


def as_of_now(upstream: Upstream, processing: int, sampled_at: float | None) -> int:
    """The busy slots a reading showed, moved on to now by what this balancer did since it was taken."""
    return processing if sampled_at is None else processing + upstream.moved_since(sampled_at)
