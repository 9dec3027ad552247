"""The slot ledger shared in Redis, for many gunicorn workers and many balancers.

Redis owns the fleet; each worker keeps a mirror of it (the plain :class:`Ledger` and
:class:`Registry` it extends) for choosing, display and gauges. Everything that must be exact runs
as one Lua script, so it is atomic across workers and hosts:

- ``take``: one slot on the chosen server, only if it still has one; the slot is a *lease* with a
  TTL that this worker renews while the request lives. A worker that dies stops renewing, and its
  slots return by themselves within ``--lease-ttl``.
- ``release``: the lease goes (idempotent), and, while any worker has requests waiting (each marks
  itself in ``PREFIX:waiting``), a ``capacity`` message wakes every worker's buffer. Without waiters
  nobody needs waking, and the 0.2 s refresh keeps the mirrors current.
- ``report`` / ``remove``: an agent's numbers, from whichever balancer it reports to.
- the queue: a request that must wait takes a numbered ticket, and ``take`` gives a slot only to the
  oldest ticket of a live worker (a new arrival only when nobody waits), so the FIFO order holds
  across every worker and balancer that shares the prefix. A worker's tickets count while its mark
  in ``PREFIX:waiting`` lives (renewed every 0.2 s): a dead worker's waiters never block the queue.

The scripts are ``paddler_sync/fleet/lua/*.lua``, each with its keys, arguments and answer in its header.
Layout (``PREFIX`` is ``--state-prefix``): set ``PREFIX:upstreams`` of server keys; hash
``PREFIX:up:KEY`` (addr, total, external, routable, sleeping, quarantined_until, reported_at); sorted sets
``PREFIX:leases:KEY`` and ``PREFIX:draining:KEY`` (lease id → expiry, Redis time in ms); hash
``PREFIX:agents`` (agent id → its record as JSON); sorted set ``PREFIX:waiting`` (workers with
waiters → mark expiry); sorted set ``PREFIX:queue`` (ticket ``WORKER:N`` → N) and counter
``PREFIX:tickets``; channel ``PREFIX:capacity``. Lease expiry uses
Redis's own clock, so balancer clocks never disagree about it; report times and quarantines use the
balancers' wall clocks (keep them in NTP sync, as for any fleet).

When Redis cannot be reached the balancer fails closed: a request that needs a slot gets 503 with
``Retry-After`` (counting locally would let N workers overbook every server, which is what this
backend exists to prevent); requests already streaming go on; agents' reports get 503 and are
retried on their next interval. Nothing needs restarting: the next command reconnects, and a Redis
that lost its data is refilled by the agents' next reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from enum import IntEnum
from importlib import resources
from typing import Any

import gevent
import redis
from gevent.event import Event

from paddler_sync.fleet.buffer import StateUnavailable, TicketLost
from paddler_sync.fleet.ledger import Ledger
from paddler_sync.fleet.policy import Policy
from paddler_sync.fleet.registry import AgentRecord, Registry, sampled_at
from paddler_sync.fleet.reports import AgentReport
from paddler_sync.fleet.upstream import Reservation, Ticket, Upstream, as_of_now

logger = logging.getLogger("paddler_sync.shared")

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError,
                ConnectionError, OSError)
SOCKET_TIMEOUT = 1.0
WAITING_MARK_TTL = 2.0  # renewed by the worker's refresh loop every 0.2 s while it has waiters
MAX_CONNECTIONS = 64  # each script takes well under a millisecond: 64 serve thousands of greenlets
RETRY_PAUSE = 0.5

SCRIPTS = ("take", "enqueue", "release", "waiting", "renew", "report", "remove", "quarantine", "snapshot")


class TakeOutcome(IntEnum):
    """What ``take.lua`` answers (its first value)."""

    TAKEN = 1
    FULL = 0
    GONE = -1  # the server left, or another one has its key now
    UNUSABLE = -2  # not routable, or quarantined
    NOT_YOUR_TURN = -3  # an older request waits (on some worker) first
    TICKET_LOST = -4  # Redis forgot the waiter's ticket (restarted empty): it draws a new one


def lua_source(name: str) -> str:
    """A script of ``paddler_sync/fleet/lua/``: each file's header documents its keys, arguments and answer."""
    return (resources.files("paddler_sync.fleet") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


class SharedState:
    """The Redis connection, key names and scripts; the one place that talks to Redis."""

    def __init__(self, url: str, prefix: str, lease_ttl: float) -> None:
        self.url = url
        self.prefix = prefix
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self.pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=SOCKET_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT, decode_responses=True)
        self.client = redis.Redis(connection_pool=self.pool)
        self.channel = f"{prefix}:capacity"
        self.reachable = True
        scripts = {name: self.client.register_script(lua_source(name)) for name in SCRIPTS}
        self._take, self._release, self._renew = scripts["take"], scripts["release"], scripts["renew"]
        self._report, self._remove, self._quarantine = scripts["report"], scripts["remove"], scripts["quarantine"]
        self._snapshot, self._waiting, self._enqueue = scripts["snapshot"], scripts["waiting"], scripts["enqueue"]
        self.queue_key = f"{prefix}:queue"
        self.worker_id = uuid.uuid4().hex
        self.waiting_key = f"{prefix}:waiting"

    def connections(self) -> int:
        """Connections open now (idle in the pool or in use), besides the pub/sub one."""
        return sum(1 for c in self.pool._connections if c is not None and c._sock is not None)

    def keys_of(self, key: str) -> list[str]:
        return [f"{self.prefix}:up:{key}", f"{self.prefix}:leases:{key}", f"{self.prefix}:draining:{key}"]

    def call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        return self._guarded(script, keys=keys, args=args)

    def _guarded(self, command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a command; an unreachable Redis becomes StateUnavailable, which callers answer with 503."""
        try:
            result = command(*args, **kwargs)
        except REDIS_ERRORS as exc:
            self._mark(False, exc)
            raise self.unavailable() from None
        self._mark(True)
        return result

    def unavailable(self) -> StateUnavailable:
        return StateUnavailable("the shared slot ledger (Redis, --state-backend) is unreachable; the balancer "
                                "refuses requests that need a slot until it is back: retry in a moment")

    def take(self, key: str, addr: str, lease: str, now: float,
             ticket: Ticket | None) -> tuple[TakeOutcome, int, int, int, int]:
        """The outcome, and the server's total, in flight, external and draining as Redis has them."""
        outcome, *counts = self.call(self._take, [*self.keys_of(key), self.queue_key, self.waiting_key],
                                     [addr, lease, self.lease_ttl_ms, now, ticket.name if ticket else "",
                                      ticket.number if ticket else 0, self.worker_id, int(WAITING_MARK_TTL * 1000)])
        total, in_flight, external, draining = counts
        return TakeOutcome(outcome), total, in_flight, external, draining

    def take_ticket(self) -> Ticket:
        number = self.call(self._enqueue, [f"{self.prefix}:tickets", self.queue_key, self.waiting_key],
                           [self.worker_id, int(WAITING_MARK_TTL * 1000)])
        return Ticket(number, f"{self.worker_id}:{number}")

    def return_ticket(self, ticket: Ticket) -> None:
        self._guarded(self.client.zrem, self.queue_key, ticket.name)

    def release(self, key: str, lease: str, draining: bool) -> int:
        _, leases, draining_key = self.keys_of(key)
        return self.call(self._release, [leases, draining_key, self.waiting_key],
                         [lease, int(draining), self.lease_ttl_ms, self.channel])

    def mark_waiting(self, anyone: bool) -> None:
        """Releases publish only while some worker has waiters: a mark that lives WAITING_MARK_TTL unless renewed."""
        self.call(self._waiting, [self.waiting_key], [self.worker_id, int(anyone), int(WAITING_MARK_TTL * 1000)])

    def renew(self, leases_by_key: dict[str, list[str]]) -> None:
        for key, leases in leases_by_key.items():
            self.call(self._renew, [self.keys_of(key)[1]], [self.lease_ttl_ms, *leases])

    def report(self, key: str, addr: str, total: int, processing: int, routable: bool, now: float,
               record: str, sleeping: bool = False) -> list[int]:
        return self.call(self._report, [*self.keys_of(key), f"{self.prefix}:upstreams", f"{self.prefix}:agents"],
                         [key, addr, total, processing, int(routable), now, record, self.channel, int(sleeping)])

    def remove(self, key: str, reported_before: float | None = None) -> bool:
        keys = [*self.keys_of(key), f"{self.prefix}:upstreams", f"{self.prefix}:agents"]
        args = [key, "" if reported_before is None else reported_before, self.channel]
        return bool(self.call(self._remove, keys, args))

    def quarantine(self, key: str, until: float) -> None:
        self.call(self._quarantine, [self.keys_of(key)[0]], [until])

    def snapshot(self) -> tuple[list[list[Any]], dict[str, str]]:
        rows, flat = self.call(self._snapshot, [f"{self.prefix}:upstreams", f"{self.prefix}:agents"], [self.prefix])
        return rows, dict(zip(flat[::2], flat[1::2], strict=True))

    def _mark(self, reachable: bool, exc: BaseException | None = None) -> None:
        if reachable != self.reachable:
            if reachable:
                logger.info("the shared slot ledger at %s is reachable again", self.url)
            else:
                logger.error("the shared slot ledger at %s is unreachable (%s): requests that need a slot get 503 "
                             "until it is back", self.url, exc)
        self.reachable = reachable


class SharedLedger(Ledger):
    """The ledger whose slots are taken and given back in Redis; the inherited state is a mirror."""

    def __init__(self, state: SharedState, policy: Policy | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(policy, clock)
        self.state = state
        self.leases: dict[str, str] = {}  # this worker's live leases: lease id -> server key
        self.agent_records: dict[str, str] = {}  # the mirror of PREFIX:agents, for the registry
        self.has_waiters = False
        self.unreturned_tickets: set[Ticket] = set()

    def reserve(self, ticket: Ticket | None = None) -> Reservation | None:
        """Choose on the mirror, take in Redis; a server that turned out full is marked so and skipped.
        While Redis is known to be down (the mirror is stale), refuse at once rather than queue."""
        self.check_available()
        now = self.clock()
        for _ in range(len(self._upstreams) + 1):
            upstream = self.policy.choose(list(self._upstreams.values()), now)
            if upstream is None:
                return None
            lease = uuid.uuid4().hex
            outcome, total, in_flight, external, draining = self.state.take(upstream.key, upstream.addr, lease, now,
                                                                            ticket)
            if outcome is TakeOutcome.NOT_YOUR_TURN:
                return None  # an older request waits, here or on another worker
            if outcome is TakeOutcome.TICKET_LOST:
                raise TicketLost(ticket)
            if outcome is TakeOutcome.TAKEN:
                self.leases[lease] = upstream.key
                _mirror_counts(upstream, total, in_flight, external, draining)
                upstream.moves.append((now, 1))
                return Reservation(upstream, lease=lease)
            if outcome is TakeOutcome.GONE:
                self._upstreams.pop(upstream.key, None)
            else:
                _mirror_counts(upstream, total, in_flight, external, draining)
                if outcome is TakeOutcome.UNUSABLE:
                    upstream.routable = False
        return None

    def take_ticket(self) -> Ticket | None:
        return self.state.take_ticket()

    def return_ticket(self, ticket: Ticket | None) -> None:
        if ticket is None:
            return
        try:
            self.state.return_ticket(ticket)
        except StateUnavailable:
            self.unreturned_tickets.add(ticket)  # it would block the queue head: retried by the refresh loop

    def waiting_changed(self, anyone: bool) -> None:
        """Renew this worker's mark while it has waiters (drawing a ticket marked it already); with none
        left, let the mark expire by itself (removing it could land after a new waiter's mark and orphan
        that waiter's ticket)."""
        self.has_waiters = anyone

    def keep_waiting_mark(self) -> None:
        """Renew this worker's mark (its tickets count only while it lives), and retry returning tickets."""
        if self.has_waiters:
            self.state.mark_waiting(True)
        for ticket in list(self.unreturned_tickets):
            self.state.return_ticket(ticket)
            self.unreturned_tickets.discard(ticket)

    def check_available(self) -> None:
        if not self.state.reachable:
            raise self.state.unavailable()

    def release(self, reservation: Reservation, draining: bool = False) -> bool:
        if reservation.released:
            return False
        reservation.released = True
        if not reservation.uses_slot or reservation.lease is None:
            return False
        key = self.leases.pop(reservation.lease, reservation.upstream.key)
        mirrored = self._upstreams.get(key)
        if mirrored is reservation.upstream and mirrored.in_flight > 0:
            mirrored.in_flight -= 1
        if not draining:
            reservation.upstream.moves.append((self.clock(), -1))
        try:
            removed = self.state.release(key, reservation.lease, draining)
        except StateUnavailable:
            logger.warning("could not give a slot of %s back to Redis: its lease expires by itself", key)
            return False
        self._capacity_may_have_grown()
        return bool(removed)

    def report(self, key: str, addr: str, total: int, processing: int, routable: bool,
               sleeping: bool = False, sampled_at: float | None = None, record: str = "{}") -> None:
        """As the plain ledger's; ``record`` (the agent's record as JSON) is stored with it, for every balancer.
        The reading is moved on by this worker's own takes and releases since it (other workers' are not known
        here: one of theirs that ended meanwhile may hide a slot until the next report)."""
        upstream = self._upstreams.get(key)
        if upstream is None or upstream.addr != addr:
            upstream = self._upstreams[key] = Upstream(key=key, addr=addr)
        processing = max(0, as_of_now(upstream, processing, sampled_at))
        in_flight, external = self.state.report(key, addr, total, processing, routable, self.clock(), record,
                                                sleeping)
        _mirror_counts(upstream, max(0, total), in_flight, external, 0)
        upstream.routable = routable
        upstream.sleeping = sleeping
        if routable:
            upstream.quarantined_until = None
        self._capacity_may_have_grown()

    def remove(self, key: str) -> Upstream | None:
        self.state.remove(key)
        return self._upstreams.pop(key, None)

    def remove_if_silent(self, key: str, reported_before: float) -> bool:
        """Remove it unless a balancer (any of them) heard from its agent after ``reported_before``."""
        if not self.state.remove(key, reported_before):
            return False
        self._upstreams.pop(key, None)
        return True

    def forget(self, key: str) -> None:
        """Out of the mirror only (Redis unreachable)."""
        self._upstreams.pop(key, None)

    def quarantine(self, key: str, seconds: float) -> float | None:
        until = super().quarantine(key, seconds)
        if until is not None:
            self.state.quarantine(key, until)
        return until

    def renew_leases(self) -> None:
        by_key: dict[str, list[str]] = {}
        for lease, key in list(self.leases.items()):
            by_key.setdefault(key, []).append(lease)
        if by_key:
            self.state.renew(by_key)

    def refresh(self) -> None:
        """Replace the mirror with Redis's view (one round trip), then let waiting requests try again."""
        rows, records = self.state.snapshot()
        seen = set()
        for key, addr, total, external, routable, quarantined_until, in_flight, draining, sleeping in rows:
            seen.add(key)
            upstream = self._upstreams.get(key)
            if upstream is None or upstream.addr != addr:
                upstream = self._upstreams[key] = Upstream(key=key, addr=addr)
            _mirror_counts(upstream, int(total), int(in_flight), int(external), int(draining))
            upstream.routable = routable == "1"
            upstream.sleeping = sleeping == "1"
            upstream.quarantined_until = float(quarantined_until) if quarantined_until else None
        for key in set(self._upstreams) - seen:
            del self._upstreams[key]
        self.agent_records = records
        self._capacity_may_have_grown()


def _mirror_counts(upstream: Upstream, total: int, in_flight: int, external: int, draining: int) -> None:
    upstream.total, upstream.in_flight, upstream.external, upstream.draining = total, in_flight, external, draining


class SharedRegistry(Registry):
    """Agents may report to any balancer: their records live in Redis, and this registry mirrors them."""

    ledger: SharedLedger

    def _report_to_ledger(self, agent_id: str, report: AgentReport, record: AgentRecord | None, now: float) -> None:
        stored = json.dumps({"report": report.to_json(),
                             "first_seen": record.first_seen if record is not None else now,
                             "last_update": now, "reports": record.reports + 1 if record is not None else 1})
        self.ledger.report(agent_id, report.external_llamacpp_addr, total=report.slots_idle + report.slots_processing,
                           processing=report.slots_processing, routable=report.is_ready,
                           sleeping=bool(report.is_sleeping), sampled_at=sampled_at(report, now), record=stored)

    def remove(self, agent_id: str, why: str) -> bool:
        return self._remove(agent_id, why, reported_before=None)

    def _remove(self, agent_id: str, why: str, reported_before: float | None) -> bool:
        """With ``reported_before``, only if no balancer heard from the agent since."""
        if agent_id not in self._agents:
            return False
        try:
            if reported_before is None:
                self.ledger.remove(agent_id)
            elif not self.ledger.remove_if_silent(agent_id, reported_before):
                return False  # another balancer heard from it meanwhile
        except StateUnavailable:
            self.ledger.forget(agent_id)  # drop it here at least; Redis drops it on the next report or expiry
        return self._forget(agent_id, why)

    def expire(self) -> list[str]:
        now = self.clock()
        gone = []
        for record in list(self._agents.values()):
            limit = self.missed_reports * record.report.monitoring_interval
            if now - record.last_update > limit and self._remove(
                    record.agent_id, f"no report for {now - record.last_update:.1f}s ({self.missed_reports} "
                                     f"intervals of {record.report.monitoring_interval:g}s)",
                    reported_before=now - limit):
                gone.append(record.agent_id)
        return gone

    def sync(self) -> None:
        """Adopt the records Redis holds (agents that report to other balancers), drop the ones it lost."""
        for agent_id, raw in self.ledger.agent_records.items():
            record = _record_from_json(agent_id, raw)
            if record is None:
                continue
            mine = self._agents.get(agent_id)
            if mine is None or mine.last_update < record.last_update:
                self._agents[agent_id] = record
        for agent_id in set(self._agents) - set(self.ledger.agent_records):
            del self._agents[agent_id]


def _record_from_json(agent_id: str, raw: str) -> AgentRecord | None:
    try:
        body = json.loads(raw)
        return AgentRecord(agent_id, AgentReport(**body["report"]), first_seen=body["first_seen"],
                           last_update=body["last_update"], reports=body["reports"])
    except (ValueError, TypeError, KeyError):
        logger.warning("ignored an unreadable record of agent %s in Redis", agent_id)
        return None


class SharedFleetSync:
    """The worker's greenlets for the shared backend: wake-ups, mirror refreshes and lease renewals."""

    def __init__(self, state: SharedState, ledger: SharedLedger, registry: SharedRegistry,
                 refresh_interval: float) -> None:
        self.state = state
        self.ledger = ledger
        self.registry = registry
        self.refresh_interval = refresh_interval
        self.wake = Event()

    def refresh_forever(self) -> None:
        """Refresh on every capacity message (coalesced) and at least every refresh interval."""
        while True:
            self.wake.wait(timeout=self.refresh_interval)
            self.wake.clear()
            try:
                self.ledger.keep_waiting_mark()
                self.ledger.refresh()
                self.registry.sync()
            except StateUnavailable:
                gevent.sleep(RETRY_PAUSE)

    def listen_forever(self) -> None:
        """Subscribe to capacity messages; reconnect whenever Redis goes away."""
        while True:
            pubsub = self.state.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.state.channel)
                self.wake.set()  # refresh after (re)subscribing: messages may have been missed
                while True:
                    if pubsub.get_message(timeout=SOCKET_TIMEOUT / 2) is not None:
                        self.wake.set()
            except REDIS_ERRORS:
                gevent.sleep(RETRY_PAUSE)
            finally:
                pubsub.close()

    def renew_forever(self) -> None:
        while True:
            gevent.sleep(self.state.lease_ttl_ms / 3000)
            with contextlib.suppress(StateUnavailable):
                self.ledger.renew_leases()
