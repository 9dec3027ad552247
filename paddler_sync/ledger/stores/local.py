"""The slot counts in this process (one gunicorn worker): the ledger's view is the truth, and each operation is a
few integer updates, with no I/O and no yielding. The interface it keeps is base.py's."""

from __future__ import annotations

from paddler_sync.ledger.slots import Claim, Reservation, Ticket, Upstream
from paddler_sync.ledger.stores.base import Snapshot, Take, TakeOutcome
from paddler_sync.protocol.models import Serving
from paddler_sync.tenants.rule import Verdict, admits, unreserved

REFUSED_BY_RULE = {Verdict.AT_CAP: TakeOutcome.AT_CAP, Verdict.RESERVED: TakeOutcome.RESERVED}


class LocalStore:
    """The counts in this process: the ledger's view *is* the truth, so each operation updates it directly."""

    overbooks = True

    def __init__(self) -> None:
        self.current: dict[str, Upstream] = {}  # the server each key names now (a new address replaces it)
        self.reported_at: dict[str, float] = {}
        self.tenants_held: dict[str, int] = {}
        self.tenant_turns: dict[str, int] = {}
        self.turn = 0

    def take(self, upstream: Upstream, now: float, ticket: Ticket | None, beyond_slots: bool,
             model: str | None = None, claim: Claim | None = None, pool: tuple[Upstream, ...] = ()) -> Take:
        if self.current.get(upstream.key) is not upstream:
            return Take(TakeOutcome.GONE)
        if not upstream.is_usable(now):
            return Take(TakeOutcome.UNUSABLE)
        if upstream.free(now) <= 0 and not beyond_slots:
            return Take(TakeOutcome.FULL)
        if claim is not None:
            free = 0 if unreserved(claim.rivals) else sum(u.free(now) for u in pool)
            verdict = admits(claim.share, self.tenants_held, free, claim.rivals)
            if verdict is not Verdict.MAY:
                return Take(REFUSED_BY_RULE[verdict])
            self.tenants_held[claim.tenant] = self.tenants_held.get(claim.tenant, 0) + 1
            self.turn += 1
            self.tenant_turns[claim.tenant] = self.turn
        upstream.in_flight += 1
        return Take(TakeOutcome.TAKEN)

    def held(self) -> dict[str, int]:
        return {name: count for name, count in self.tenants_held.items() if count}

    def turns(self) -> dict[str, int]:
        return self.tenant_turns

    def release(self, reservation: Reservation, lingering: bool) -> bool:
        if reservation.tenant is not None:  # the tenant's count goes down even when the server has gone
            self.tenants_held[reservation.tenant] -= 1
        upstream = reservation.upstream
        if self.current.get(upstream.key) is not upstream:
            return False  # removed (or replaced) since: its counts went with it
        upstream.in_flight -= 1
        if lingering:  # still running in llama.cpp: the next reading shows it, and must count it as external
            upstream.lingering += 1
        return True

    def report(self, upstream: Upstream, total: int, processing: int, routable: bool, sleeping: bool,
               now: float, record: str, serving: Serving) -> None:
        self.current[upstream.key] = upstream
        self.reported_at[upstream.key] = now
        upstream.total = total
        upstream.external = max(0, processing - upstream.in_flight)
        upstream.lingering = 0

    def remove(self, key: str, reported_before: float | None = None, agent: str | None = None) -> bool:
        if reported_before is not None and self.reported_at.get(key, 0.0) > reported_before:
            return False
        self.current.pop(key, None)
        self.reported_at.pop(key, None)
        return True

    def quarantine(self, key: str, until: float) -> None:
        """The view holds it (the ledger sets it there); nothing else to keep."""

    def take_ticket(self, model: str | None, tenant: str | None = None) -> Ticket | None:
        return None  # one process: the buffer's own queues are the order

    def return_ticket(self, ticket: Ticket | None) -> None:
        """No tickets here."""

    def waiting_changed(self, anyone: bool) -> None:
        """Nobody else to wake."""

    def check_available(self) -> None:
        """Always available."""

    def snapshot(self) -> Snapshot | None:
        return None
