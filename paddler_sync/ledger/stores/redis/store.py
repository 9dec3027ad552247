"""The slot store in Redis, for many gunicorn workers and many balancers (``--state-backend redis://...``).

Redis owns the fleet; each worker's ledger and registry keep a mirror of it (refreshed from one
snapshot) for choosing, display and gauges. Everything that must be exact runs as one Lua script,
so it is atomic across workers and hosts:

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

The scripts are ``paddler_sync/ledger/stores/redis/lua/*.lua``, each with its keys, arguments and answer in its header.
Layout (``PREFIX`` is ``--state-prefix``; on a Redis Cluster, ``{PREFIX}``: one hash slot for the whole fleet, see
connect.py): set ``PREFIX:upstreams`` of server keys; hash
``PREFIX:up:KEY`` (addr, total, external, routable, sleeping, quarantined_until, reported_at, serving: the
models it serves as JSON); sorted sets
``PREFIX:leases:KEY`` and ``PREFIX:draining:KEY`` (lease id → expiry, Redis time in ms; the second holds the
lingering slots, keeping the name older balancers sharing the prefix use); hash
``PREFIX:agents`` (agent id → its record as JSON); sorted set ``PREFIX:waiting`` (workers with
waiters → mark expiry); sorted sets ``PREFIX:queue`` (requests naming no model) and ``PREFIX:queue:model:NAME``
(one per model named; ticket ``WORKER:N`` → N) and counter ``PREFIX:tickets``; channel ``PREFIX:capacity``;
with tenants (``--tenants``): each queue is one per tenant (``...:tenant:NAME``), sorted sets
``PREFIX:tenant:NAME:leases`` (the tenant's slots, expiring like the servers' leases), counter ``PREFIX:turns`` and
hash ``PREFIX:tenant_turns`` (each tenant's last take), and strings ``PREFIX:rate:NAME:KIND:MINUTE``
(paddler_sync/ledger/stores/redis/rates.py);
per balancer (``B`` is ``HOST:MASTER_PID``) hash
``PREFIX:counts:B`` (its counts, a day's TTL) and hashes ``PREFIX:counts:B:traffic:RANGE:INDEX`` (the dashboards'
sums per bucket, the range's TTL). Lease expiry uses
Redis's own clock, so balancer clocks never disagree about it; report times and quarantines use the
balancers' wall clocks (keep them in NTP sync, as for any fleet).

When Redis cannot be reached no slot is taken (counting locally would let N workers overbook every
server, which is what this backend exists to prevent): a request that needs a slot waits in the buffer
for Redis as for a slot, and gets 503 with ``Retry-After`` only if its wait ends first; requests already
streaming go on; agents' reports get 503 and are retried on their next interval. Nothing needs
restarting: the next command reconnects (to the new master, after a Sentinel failover), a Redis that
lost its data is refilled by the agents' next reports, and the leases a new master lacks are put back
by the workers that hold them (``renew.lua``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from importlib import resources
from typing import Any

import redis

from paddler_sync.ledger.refusals import StateUnavailable
from paddler_sync.ledger.slots import Claim, Reservation, Ticket, Upstream
from paddler_sync.ledger.stores.base import Snapshot, Take, TakeOutcome
from paddler_sync.ledger.stores.redis.connect import (
    Client,
    cluster_prefix,
    connect,
    is_cluster,
    open_connections,
    redacted,
)
from paddler_sync.protocol.models import Serving
from paddler_sync.protocol.reports import agent_of

logger = logging.getLogger("paddler_sync.shared")

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, redis.ReadOnlyError,
                redis.exceptions.ClusterError, redis.exceptions.TryAgainError, redis.exceptions.SlotNotCoveredError,
                redis.exceptions.RedisClusterUnreachableError, ConnectionError, OSError)
SOCKET_TIMEOUT = 1.0
WAITING_MARK_TTL = 2.0  # renewed by the worker's refresh loop every 0.2 s while it has waiters
MAX_CONNECTIONS = 64  # each script takes well under a millisecond: 64 serve thousands of greenlets
RETRY_PAUSE = 0.5
COUNTS_TTL = 86_400  # seconds: a stopped balancer's counts go a day after its last increment
COUNTS_FLUSH_SECONDS = 1.0
AFFINITY_KEPT = 20_000  # prompts routed, fleet-wide, that a new worker can still learn from
AFFINITY_READ = 5_000


def lua_source(name: str, package: str = __package__) -> str:
    """A script of ``PACKAGE/lua/`` (the slot scripts: this package's); its header says keys, arguments, answer."""
    return (resources.files(package) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


class RedisStore:
    """The slot store in Redis: the connection, key names and scripts, and this worker's leases and tickets.
    The one place that talks to Redis."""

    overbooks = False  # never beyond the free slots: N workers could each overbook a server

    def __init__(self, url: str, prefix: str, lease_ttl: float) -> None:
        self.url = url
        self.prefix = cluster_prefix(prefix) if is_cluster(url) else prefix  # a cluster: one slot for the fleet
        self.lease_ttl_ms = int(lease_ttl * 1000)
        self._client: Client | None = None
        self._scripts: dict[tuple[str, str], Any] = {}
        self._connect_failed_at = float("-inf")
        self.channel = f"{self.prefix}:capacity"
        self.reachable = True
        self.queue_key = f"{self.prefix}:queue"
        self.worker_id = uuid.uuid4().hex
        self.waiting_key = f"{self.prefix}:waiting"
        self.leases: dict[str, str] = {}  # this worker's live leases: lease id -> server key
        self.lease_tenants: dict[str, str] = {}  # and the tenant of each that has one (--tenants)
        self.tenants_held: dict[str, int] = {}  # slots each tenant holds, fleet-wide, as of the last refresh
        self.tenant_turns: dict[str, int] = {}  # and each one's last take's turn (take.lua ranks by them)
        self.has_waiters = False
        self.unreturned_tickets: set[Ticket] = set()
        self.unreleased: list[tuple[list[str], list[Any]]] = []  # release.lua calls Redis missed (catch_up)
        self.back_from_outage = False  # Redis answered again: catch_up renews every lease at once
        with contextlib.suppress(StateUnavailable):
            self.client  # noqa: B018 - connect now when it can (a cluster asks for its slots), or on first use

    @property
    def client(self) -> Client:
        """The connection, made on first use: a cluster that cannot be reached at start is asked again (at most
        every RETRY_PAUSE) instead of failing the balancer's start."""
        if self._client is None:
            if time.monotonic() - self._connect_failed_at < RETRY_PAUSE:
                raise self.unavailable()
            try:
                self._client = connect(self.url, MAX_CONNECTIONS, SOCKET_TIMEOUT)
            except REDIS_ERRORS as exc:
                self._connect_failed_at = time.monotonic()
                self._mark(False, exc)
                raise self.unavailable() from None
        return self._client

    def script(self, name: str, package: str = __package__) -> Any:
        """``lua/NAME.lua`` of ``package`` (the slot scripts are this one's), registered once with the client (it
        loads itself where it runs)."""
        client = self.client
        if (package, name) not in self._scripts:
            self._scripts[package, name] = client.register_script(lua_source(name, package))
        return self._scripts[package, name]

    def connections(self) -> int:
        """Connections open now (idle in the pool or in use), besides the pub/sub one."""
        return open_connections(self._client) if self._client is not None else 0

    def server_time(self) -> int:
        """Redis's clock (s), from the node that holds the fleet's keys (lease expiries are on its clock)."""
        client = self.client
        if isinstance(client, redis.Redis):
            return int(self._guarded(client.time)[0])
        return int(self._guarded(client.time, target_nodes=client.get_node_from_key(self.queue_key))[0])

    def keys_of(self, key: str) -> list[str]:
        return [f"{self.prefix}:up:{key}", f"{self.prefix}:leases:{key}", f"{self.prefix}:draining:{key}"]

    def call(self, script: str, keys: list[str], args: list[Any], package: str = __package__) -> Any:
        return self._guarded(lambda: self.script(script, package)(keys=keys, args=args))

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

    def check_available(self) -> None:
        """While Redis is known to be down (the mirror is stale), refuse at once rather than queue."""
        if not self.reachable:
            raise self.unavailable()

    # --- the slot store -------------------------------------------------------------------------------------

    def queue_of(self, model: str | None) -> str:
        """The shared queue of requests for ``model``: each model's waiters keep their own order."""
        return self.queue_key if model is None else f"{self.queue_key}:model:{model}"

    def tenant_queue(self, model: str | None, tenant: str | None) -> str:
        return self.queue_of(model) if tenant is None else f"{self.queue_of(model)}:tenant:{tenant}"

    def tenant_leases(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:leases"

    def take(self, upstream: Upstream, now: float, ticket: Ticket | None, beyond_slots: bool,
             model: str | None = None, claim: Claim | None = None, pool: tuple[Upstream, ...] = ()) -> Take:
        """take.lua; the mirror gets the counts Redis holds. Never beyond the free slots."""
        lease = uuid.uuid4().hex
        tenant = claim.tenant if claim is not None else None
        queue = ticket.queue if ticket is not None else self.tenant_queue(model, tenant)
        keys = [*self.keys_of(upstream.key), queue, self.waiting_key]
        args: list[Any] = [upstream.addr, lease, self.lease_ttl_ms, now, ticket.name if ticket else "",
                           ticket.number if ticket else 0, self.worker_id, int(WAITING_MARK_TTL * 1000)]
        if claim is not None:
            self._tenant_arguments(claim, model, pool, keys, args)
        outcome, total, in_flight, external, lingering, *turn = self.call("take", keys, args)
        outcome = TakeOutcome(outcome)
        if outcome in (TakeOutcome.TAKEN, TakeOutcome.FULL, TakeOutcome.UNUSABLE):
            upstream.set_counts(total, in_flight, external, lingering)
        if outcome is not TakeOutcome.TAKEN:
            return Take(outcome)
        self.leases[lease] = upstream.key
        if tenant is not None:
            self.lease_tenants[lease] = tenant
            self.tenants_held[tenant] = self.tenants_held.get(tenant, 0) + 1
            self.tenant_turns[tenant] = int(turn[0])
        return Take(outcome, lease)

    def _tenant_arguments(self, claim: Claim, model: str | None, pool: tuple[Upstream, ...], keys: list[str],
                          args: list[Any]) -> None:
        """The tenant rule's inputs for take.lua: every rival's queue, leases and numbers, and the pool."""
        rivals = claim.rivals if claim.share in claim.rivals else (*claim.rivals, claim.share)
        keys += [f"{self.prefix}:turns", self.turns_key]
        keys += [self.tenant_queue(model, r.name) for r in rivals]
        keys += [self.tenant_leases(r.name) for r in rivals]
        args += [len(rivals), rivals.index(claim.share) + 1]
        for r in rivals:
            args += [r.name, r.priority, repr(r.weight), r.reserved_slots, r.max_slots]
        counted = () if all(r.reserved_slots == 0 for r in rivals) else pool
        args.append(len(counted))
        for server in counted:
            keys += self.keys_of(server.key)

    def held(self) -> dict[str, int]:
        return {name: count for name, count in self.tenants_held.items() if count}

    def turns(self) -> dict[str, int]:
        return self.tenant_turns

    @property
    def turns_key(self) -> str:
        return f"{self.prefix}:tenant_turns"

    def refresh_held(self, tenants: list[str]) -> None:
        """Every tenant's slots held fleet-wide (all workers and balancers), for ordering and the gauges."""
        if not tenants:
            return
        now_ms = self.server_time() * 1000

        def read() -> list[Any]:
            with self.client.pipeline(transaction=False) as pipe:
                for tenant in tenants:
                    pipe.zcount(self.tenant_leases(tenant), now_ms, "+inf")
                pipe.hgetall(self.turns_key)
                return pipe.execute()

        *held, turns = self._guarded(read)
        self.tenants_held = dict(zip(tenants, held, strict=True))
        self.tenant_turns = {name: int(turn) for name, turn in turns.items()}

    def release(self, reservation: Reservation, lingering: bool) -> bool:
        """release.lua; a Redis that cannot be reached lets the lease expire by itself."""
        if reservation.lease is None:
            return False
        key = self.leases.pop(reservation.lease, reservation.upstream.key)
        self.lease_tenants.pop(reservation.lease, None)
        if reservation.upstream.in_flight > 0:  # the mirror does what the script does
            reservation.upstream.in_flight -= 1
            reservation.upstream.lingering += int(lingering)
        _, leases, lingering_key = self.keys_of(key)
        keys = [leases, lingering_key, self.waiting_key]
        if reservation.tenant is not None:
            keys.append(self.tenant_leases(reservation.tenant))
            self.tenants_held[reservation.tenant] = max(0, self.tenants_held.get(reservation.tenant, 0) - 1)
        args = [reservation.lease, int(lingering), self.lease_ttl_ms, self.channel]
        try:
            self.call("release", keys, args)
        except StateUnavailable:
            logger.warning("could not give a slot of %s back to Redis: given back when it answers again (or its "
                           "lease expires)", key)
            self.unreleased.append((keys, args))
            return False
        return True

    def catch_up(self) -> None:
        """After an outage (a failover): the leases this worker holds are written at once, not at the next renewal
        (a new master may lack the old one's last writes, and would give those slots twice meanwhile), and slots
        given back while Redis was away are given back now (a new master may hold their leases, replicated before
        the old one died, which would otherwise keep them until they expire)."""
        if self.back_from_outage:
            self.renew_leases()  # StateUnavailable: away again, tried on the next call
            self.back_from_outage = False
        while self.unreleased:
            keys, args = self.unreleased[0]
            self.call("release", keys, args)  # StateUnavailable: still away, kept for the next try
            self.unreleased.pop(0)

    def report(self, upstream: Upstream, total: int, processing: int, routable: bool, sleeping: bool,
               now: float, record: str, serving: Serving) -> None:
        in_flight, external = self.call(
            "report", [*self.keys_of(upstream.key), f"{self.prefix}:upstreams", f"{self.prefix}:agents"],
            [upstream.key, upstream.addr, total, processing, int(routable), now, record, self.channel,
             int(sleeping), serving.to_json(), agent_of(upstream.key)])
        upstream.set_counts(total, in_flight, external, 0)

    def remove(self, key: str, reported_before: float | None = None, agent: str | None = None) -> bool:
        keys = [*self.keys_of(key), f"{self.prefix}:upstreams", f"{self.prefix}:agents"]
        args = [key, "" if reported_before is None else reported_before, self.channel, agent or ""]
        return bool(self.call("remove", keys, args))

    def quarantine(self, key: str, until: float) -> None:
        self.call("quarantine", [self.keys_of(key)[0]], [until])

    def snapshot(self) -> Snapshot:
        rows, flat = self.call("snapshot", [f"{self.prefix}:upstreams", f"{self.prefix}:agents"], [self.prefix])
        return Snapshot(rows, dict(zip(flat[::2], flat[1::2], strict=True)))

    # --- the queue shared by every worker -------------------------------------------------------------

    def take_ticket(self, model: str | None, tenant: str | None = None) -> Ticket:
        queue = self.tenant_queue(model, tenant)
        number = self.call("enqueue", [f"{self.prefix}:tickets", queue, self.waiting_key],
                           [self.worker_id, int(WAITING_MARK_TTL * 1000)])
        return Ticket(number, f"{self.worker_id}:{number}", queue)

    def return_ticket(self, ticket: Ticket | None) -> None:
        if ticket is None:
            return
        try:
            self._guarded(self.client.zrem, ticket.queue, ticket.name)
        except StateUnavailable:
            self.unreturned_tickets.add(ticket)  # it would block the queue head: retried by the refresh loop

    def waiting_changed(self, anyone: bool) -> None:
        """Renew this worker's mark while it has waiters (drawing a ticket marked it already); with none
        left, let the mark expire by itself (removing it could land after a new waiter's mark and orphan
        that waiter's ticket)."""
        self.has_waiters = anyone

    def mark_waiting(self, anyone: bool) -> None:
        """Releases publish only while some worker has waiters: a mark that lives WAITING_MARK_TTL unless renewed."""
        self.call("waiting", [self.waiting_key], [self.worker_id, int(anyone), int(WAITING_MARK_TTL * 1000)])

    def keep_waiting_mark(self) -> None:
        """Renew this worker's mark (its tickets count only while it lives), and retry returning tickets."""
        if self.has_waiters:
            self.mark_waiting(True)
        for ticket in list(self.unreturned_tickets):
            self._guarded(self.client.zrem, ticket.queue, ticket.name)
            self.unreturned_tickets.discard(ticket)

    def renew_leases(self) -> None:
        """Each live lease's expiry, in its server's set and in its tenant's (renew.lua puts back the ones a new
        master lost). Each set's leases are read just before its call: one given back while an earlier call waited
        for Redis must not come back."""
        lease_sets = {self.keys_of(key)[1] for key in self.leases.values()}
        lease_sets |= {self.tenant_leases(tenant) for tenant in self.lease_tenants.values()}
        for lease_set in lease_sets:
            leases = self._leases_in(lease_set)
            if leases:
                self.call("renew", [lease_set], [self.lease_ttl_ms, *leases])

    def _leases_in(self, lease_set: str) -> list[str]:
        return ([lease for lease, key in self.leases.items() if self.keys_of(key)[1] == lease_set]
                + [lease for lease, tenant in self.lease_tenants.items() if self.tenant_leases(tenant) == lease_set])

    # --- the balancer's counts, summed over its workers ------------------------------------------------------

    def add_counts(self, batches: list[tuple[str, dict[str, float], int]]) -> None:
        """Increments into hashes of the balancer's, ``(key, increments, ttl)`` each, in one round trip; each hash
        expires ``ttl`` s after its last write."""
        def write() -> None:
            with self.client.pipeline(transaction=False) as pipe:
                for key, increments, ttl in batches:
                    for field, value in increments.items():
                        if float(value).is_integer():
                            pipe.hincrby(key, field, int(value))
                        else:
                            pipe.hincrbyfloat(key, field, value)
                    pipe.expire(key, ttl)
                pipe.execute()

        if batches:
            self._guarded(write)

    def counts(self, key: str) -> dict[str, float]:
        return {field: float(value) for field, value in self._guarded(self.client.hgetall, key).items()}

    def many_counts(self, keys: list[str], labels: list[int]) -> dict[int, dict[str, float]]:
        """Several hashes in one round trip, by label; empty ones left out."""
        def read() -> list[dict[str, str]]:
            with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                return pipe.execute()

        return {label: {k: float(v) for k, v in fields.items()}
                for label, fields in zip(labels, self._guarded(read), strict=True) if fields}

    def _mark(self, reachable: bool, exc: BaseException | None = None) -> None:
        if reachable != self.reachable:
            if reachable:
                logger.info("the shared slot ledger at %s is reachable again", redacted(self.url))
                self.back_from_outage = True
            else:
                logger.error("the shared slot ledger at %s is unreachable (%s): requests that need a slot wait for "
                             "it (503 when their wait ends first)", redacted(self.url), exc)
        self.reachable = reachable
