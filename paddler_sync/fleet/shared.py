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
from typing import Any

import gevent
import redis
from gevent.event import Event

from paddler_sync.fleet.buffer import StateUnavailable, TicketLost
from paddler_sync.fleet.ledger import Ledger, Reservation, Ticket, Upstream, as_of_now
from paddler_sync.fleet.policy import Policy
from paddler_sync.fleet.registry import AgentRecord, Registry, sampled_at
from paddler_sync.fleet.reports import AgentReport

logger = logging.getLogger("paddler_sync.shared")

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError,
                ConnectionError, OSError)
SOCKET_TIMEOUT = 1.0
WAITING_MARK_TTL = 2.0  # renewed by the worker's refresh loop every 0.2 s while it has waiters
MAX_CONNECTIONS = 64  # each script takes well under a millisecond: 64 serve thousands of greenlets
RETRY_PAUSE = 0.5

NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "

TAKE = NOW_MS + """
if ARGV[5] ~= '' then  -- a waiter: its worker is alive; a ticket Redis lost (restarted empty) is redrawn
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[8]), ARGV[7])
  if not redis.call('ZSCORE', KEYS[4], ARGV[5]) then return {-4, 0, 0, 0, 0} end
end
local head = false
for _ = 1, 100 do  -- the oldest ticket of a live worker; a dead worker's tickets go
  local first = redis.call('ZRANGE', KEYS[4], 0, 0)
  if #first == 0 then break end
  local alive = redis.call('ZSCORE', KEYS[5], string.match(first[1], '^([^:]+):'))
  if alive and tonumber(alive) >= now then head = first[1] break end
  redis.call('ZREM', KEYS[4], first[1])
end
if head and head ~= ARGV[5] then return {-3, 0, 0, 0, 0} end
if redis.call('HGET', KEYS[1], 'addr') ~= ARGV[1] then return {-1, 0, 0, 0, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local h = redis.call('HMGET', KEYS[1], 'total', 'external', 'routable', 'quarantined_until')
local total = tonumber(h[1]) or 0
local external = tonumber(h[2]) or 0
local in_flight = redis.call('ZCARD', KEYS[2])
local draining = redis.call('ZCARD', KEYS[3])
if h[3] ~= '1' or (tonumber(h[4]) or 0) > tonumber(ARGV[4]) then
  return {-2, total, in_flight, external, draining}
end
if in_flight + external + draining >= total then return {0, total, in_flight, external, draining} end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[4], ARGV[5]) end
return {1, total, in_flight + 1, external, draining}
"""

ENQUEUE = NOW_MS + """
local number = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], number, ARGV[1] .. ':' .. number)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
return number
"""

RELEASE = NOW_MS + """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if removed == 1 and ARGV[2] == '1' then redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1]) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) > 0 then redis.call('PUBLISH', ARGV[4], 'release') end
return removed
"""

WAITING = NOW_MS + """
if ARGV[2] == '1' then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
else redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
"""

RENEW = NOW_MS + """
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
return #ARGV - 1
"""

REPORT = NOW_MS + """
if redis.call('HGET', KEYS[1], 'addr') ~= ARGV[2] then redis.call('DEL', KEYS[2], KEYS[3]) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('DEL', KEYS[3])
local in_flight = redis.call('ZCARD', KEYS[2])
local external = math.max(0, tonumber(ARGV[4]) - in_flight)
redis.call('HSET', KEYS[1], 'addr', ARGV[2], 'total', ARGV[3], 'external', external, 'routable', ARGV[5],
           'reported_at', ARGV[6], 'sleeping', ARGV[9])
if ARGV[5] == '1' then redis.call('HDEL', KEYS[1], 'quarantined_until') end
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[7])
redis.call('PUBLISH', ARGV[8], 'report')
return {in_flight, external}
"""

REMOVE = """
if ARGV[2] ~= '' then
  local at = tonumber(redis.call('HGET', KEYS[1], 'reported_at'))
  if at and at > tonumber(ARGV[2]) then return 0 end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('PUBLISH', ARGV[3], 'remove')
return 1
"""

QUARANTINE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'quarantined_until', ARGV[1])
return 1
"""

SNAPSHOT = NOW_MS + """
local out = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local up, leases, draining = ARGV[1] .. ':up:' .. key, ARGV[1] .. ':leases:' .. key, ARGV[1] .. ':draining:' .. key
  if redis.call('EXISTS', up) == 0 then
    redis.call('SREM', KEYS[1], key)
  else
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
    redis.call('ZREMRANGEBYSCORE', draining, '-inf', now)
    local h = redis.call('HMGET', up, 'addr', 'total', 'external', 'routable', 'quarantined_until', 'sleeping')
    table.insert(out, {key, h[1] or '', h[2] or '0', h[3] or '0', h[4] or '0', h[5] or '',
                       redis.call('ZCARD', leases), redis.call('ZCARD', draining), h[6] or '0'})
  end
end
return {out, redis.call('HGETALL', KEYS[2])}
"""


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
        self._take = self.client.register_script(TAKE)
        self._release = self.client.register_script(RELEASE)
        self._renew = self.client.register_script(RENEW)
        self._report = self.client.register_script(REPORT)
        self._remove = self.client.register_script(REMOVE)
        self._quarantine = self.client.register_script(QUARANTINE)
        self._snapshot = self.client.register_script(SNAPSHOT)
        self._waiting = self.client.register_script(WAITING)
        self._enqueue = self.client.register_script(ENQUEUE)
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

    def take(self, key: str, addr: str, lease: str, now: float, ticket: Ticket | None) -> list[int]:
        """Outcome 1 taken, 0 full, -1 gone, -2 not usable, -3 an older request waits (on some worker) first,
        -4 the ticket is unknown (Redis lost its data)."""
        return self.call(self._take, [*self.keys_of(key), self.queue_key, self.waiting_key],
                         [addr, lease, self.lease_ttl_ms, now, ticket.name if ticket else "",
                          ticket.number if ticket else 0,
                          self.worker_id, int(WAITING_MARK_TTL * 1000)])

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
            if outcome == -3:
                return None  # not this request's turn: an older one waits, here or on another worker
            if outcome == -4:
                raise TicketLost(ticket)
            if outcome == 1:
                self.leases[lease] = upstream.key
                _mirror_counts(upstream, total, in_flight, external, draining)
                upstream.moves.append((now, 1))
                return Reservation(upstream, lease=lease)
            if outcome == -1:
                self._upstreams.pop(upstream.key, None)
            else:
                _mirror_counts(upstream, total, in_flight, external, draining)
                if outcome == -2:
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
