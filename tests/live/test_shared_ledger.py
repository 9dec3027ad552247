"""The slot ledger shared in Redis: exact across workers and balancers, self-healing when one dies.

The property test drives two ledgers over Redis stores (two workers) against a real redis-server; the rest
start real balancers (``paddler-sync balancer --workers 2`` and a bare ``gunicorn -w 2``),
simulators and agents, and kill things with -9.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.slots import GiveBack, Reservation, Ticket, TicketLost
from paddler_sync.ledger.stores.redis import store as redis_store
from paddler_sync.ledger.stores.redis.store import RedisStore
from tests.fakes import Clock
from tests.helpers import (
    PYTHON,
    ROOT,
    Fleet,
    Proc,
    RedisServer,
    agents,
    background_traffic,
    complete,
    free_port,
    health,
    internals,
    port_open,
    run_cli,
    settled,
    sim_stats,
    wait_until,
)

KEYS = ["a", "b", "c"]
INTERVAL = 0.2


# --- the ledger itself, two workers on one Redis -----------------------------------------------------



class TwoWorkers(RuleBasedStateMachine):
    """Random interleavings of report / take / release / remove / refresh on two workers' mirrors, and of
    requests that wait: tickets drawn, served (each worker serves its oldest) and given back."""

    url = ""

    def __init__(self) -> None:
        super().__init__()
        prefix = f"p{uuid.uuid4().hex[:10]}"
        self.clock = Clock()
        self.workers = [Ledger(store=RedisStore(self.url, prefix, lease_ttl=60), clock=self.clock) for _ in range(2)]
        self.truth = self.workers[0].store
        self.held: list[tuple[int, Reservation]] = []
        self.tickets: list[tuple[int, Ticket]] = []  # outstanding, in the order they were drawn

    def counts(self) -> dict[str, tuple[int, int, int, int]]:
        """Redis's view: key -> (total, in_flight, external, draining)."""
        rows, _ = self.truth.snapshot()
        return {row[0]: (int(row[2]), int(row[6]), int(row[3]), int(row[7])) for row in rows}

    @rule(worker=st.integers(0, 1), key=st.sampled_from(KEYS), total=st.integers(0, 4),
          processing=st.integers(0, 4), routable=st.booleans(), port=st.sampled_from([1, 2]))
    def report(self, worker: int, key: str, total: int, processing: int, routable: bool, port: int) -> None:
        addr = f"10.0.0.1:{port}{ord(key)}"
        known = {row[0]: row[1] for row in self.truth.snapshot()[0]}.get(key)
        self.workers[worker].report(key, addr, total, min(processing, total), routable)
        if known is not None and known != addr:  # another server under the key: the old one's leases are void
            self.held = [(w, r) for w, r in self.held if r.upstream.key != key]

    @rule(worker=st.integers(0, 1), fresh=st.booleans())
    def take(self, worker: int, fresh: bool) -> None:
        ledger = self.workers[worker]
        if fresh:
            ledger.refresh()
        before = self.counts()
        free_before = {k: t - i - e - d for k, (t, i, e, d) in before.items()}
        reservation = ledger.reserve()
        if self.tickets:
            assert reservation is None  # a new arrival never jumps the queue
            return
        if reservation is None:
            if fresh:  # a worker with a fresh mirror refuses only when nothing is free anywhere
                usable = {u.key for u in ledger.upstreams() if u.is_usable(self.clock())}
                assert all(free_before[k] <= 0 for k in usable), (before, usable)
            return
        key = reservation.upstream.key
        assert free_before[key] > 0, (before, key)  # the last slot is never taken twice
        total, in_flight, external, draining = self.counts()[key]
        assert in_flight + external + draining <= total
        self.held.append((worker, reservation))

    @rule(worker=st.integers(0, 1))
    def draw_ticket(self, worker: int) -> None:
        self.tickets.append((worker, self.workers[worker].take_ticket()))

    @precondition(lambda self: self.tickets)
    @rule(worker=st.integers(0, 1))
    def take_with_the_workers_oldest_ticket(self, worker: int) -> None:
        mine = [t for w, t in self.tickets if w == worker]
        if not mine:
            return
        self.workers[worker].refresh()
        reservation = self.workers[worker].reserve(ticket=mine[0])
        if reservation is not None:
            assert self.tickets[0] == (worker, mine[0])  # only the oldest ticket anywhere is served
            self.tickets.remove((worker, mine[0]))
            self.held.append((worker, reservation))

    @precondition(lambda self: self.tickets)
    @rule(index=st.integers(0, 50))
    def waiter_leaves(self, index: int) -> None:
        worker, ticket = self.tickets.pop(index % len(self.tickets))
        self.workers[worker].return_ticket(ticket)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 50), draining=st.booleans())
    def release(self, index: int, draining: bool) -> None:
        worker, reservation = self.held.pop(index % len(self.held))
        self.workers[worker].give_back(reservation, GiveBack.BROKE_OFF if draining else GiveBack.ANSWERED)
        assert not self.workers[worker].give_back(reservation)

    @rule(worker=st.integers(0, 1), key=st.sampled_from(KEYS))
    def remove(self, worker: int, key: str) -> None:
        """Its requests still run: their leases stay, and count again if it comes back (at any address)."""
        self.workers[worker].remove(key)

    @rule(worker=st.integers(0, 1))
    def refresh(self, worker: int) -> None:
        self.workers[worker].refresh()
        truth = self.counts()
        assert {u.key for u in self.workers[worker].upstreams()} == set(truth)

    @invariant()
    def leases_are_exactly_the_reservations_held(self) -> None:
        for key, (_, in_flight, _, _) in self.counts().items():  # a removed server's are counted when it is back
            assert in_flight == sum(1 for _, r in self.held if r.upstream.key == key), (key, self.counts())


@pytest.fixture
def two_workers(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> type[TwoWorkers]:
    monkeypatch.setattr(redis_store, "WAITING_MARK_TTL", 600.0)  # both workers live through every example
    TwoWorkers.url = redis_server.url
    return TwoWorkers


def test_two_workers_never_take_the_last_slot_twice(two_workers: type[TwoWorkers]) -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(two_workers, settings=settings(max_examples=150, stateful_step_count=40,
                                                             deadline=None))


# --- real balancers -------------------------------------------------------------------------------

def gunicorn_balancer(fleet: Fleet, redis_url: str, prefix: str, workers: int, *args: str) -> Proc:
    """A bare ``gunicorn -w N -k gevent wsgi:balancer``, configured through PADDLER_* variables."""
    proxy, management = free_port(), free_port()
    proc = fleet.spawn("gunicorn", [str(Path(PYTHON).parent / "gunicorn"), "-k", "gevent", "-w", str(workers),
                                    "-b", f"127.0.0.1:{proxy}", "--no-control-socket", "--chdir", str(ROOT),
                                    *args, "wsgi:balancer"], management,
                       env={"PADDLER_MANAGEMENT_ADDR": f"127.0.0.1:{management}", "PADDLER_STATE_BACKEND": redis_url,
                            "PADDLER_STATE_PREFIX": prefix})
    wait_until(lambda: port_open(proxy))
    proc.extra.update(proxy=f"http://127.0.0.1:{proxy}", management=f"http://127.0.0.1:{management}",
                      proxy_port=proxy, management_port=management)
    return proc


def shared_fleet(fleet: Fleet, redis_url: str, slots: list[int], tokens_per_second: str = "40",
                 lease_ttl: str = "15", report_to: int | None = None) -> tuple[list[Proc], list[Proc]]:
    """Two balancers (embedded gunicorn --workers 2, bare gunicorn -w 2) on one prefix; agents split between
    them, or all report to balancer ``report_to``."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    fleet.redis_url = redis_url
    first = fleet.balancer("--workers", "2", "--lease-ttl", lease_ttl, "--buffered-request-timeout", "60",
                           prefix=prefix)
    second = gunicorn_balancer(fleet, redis_url, prefix, 2)
    balancers = [first, second]
    sims = []
    for i, n in enumerate(slots):
        sim = fleet.simulator("--parallel", str(n), "--decode-tokens-per-second", tokens_per_second)
        target = balancers[i % 2 if report_to is None else report_to]
        fleet.agent(sim.port, target.extra["management_port"], "--name", f"s{i}", interval=INTERVAL)
        sims.append(sim)
    for balancer in balancers:
        wait_until(lambda b=balancer: len(agents(b)) == len(slots) and all(a["state"] == "ready" for a in agents(b)))
    return balancers, sims


def test_two_balancers_with_two_workers_each_never_make_llamacpp_queue(fleet: Fleet,
                                                                        redis_server: RedisServer) -> None:
    balancers, sims = shared_fleet(fleet, redis_server.url, [2, 3, 1])
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda i: complete(balancers[i % 2], 15, timeout=60), range(48)))
    assert [r.status_code for r in results] == [200] * 48
    assert [sim_stats(s)["requests_deferred_total"] for s in sims] == [0, 0, 0]  # nobody ever queued in llama.cpp
    assert sum(sim_stats(s)["requests_total"] for s in sims) == 48
    for balancer in balancers:
        wait_until(lambda b=balancer: health(b)["requests_in_flight"] == 0, timeout=5)
        assert "Traceback" not in balancer.log()


def test_worker_count_needs_the_shared_ledger(fleet: Fleet, redis_server: RedisServer) -> None:
    refused = run_cli("balancer", "--workers", "2")
    assert refused.returncode == 2 and "--state-backend" in refused.stderr
    bare = fleet.spawn("gunicorn", [str(Path(PYTHON).parent / "gunicorn"), "-k", "gevent", "-w", "2", "-b",
                                    f"127.0.0.1:{free_port()}", "wsgi:balancer"], cwd=ROOT,  # reads gunicorn.conf.py
                       env={"PADDLER_MANAGEMENT_ADDR": f"127.0.0.1:{free_port()}"})
    assert bare.popen.wait(30) != 0 and "redis://" in bare.log()
    elsewhere = fleet.spawn("elsewhere", [str(Path(PYTHON).parent / "gunicorn"), "-k", "gevent", "-w", "2", "-b",
                                          f"127.0.0.1:{free_port()}", "--no-control-socket", "--chdir", str(ROOT),
                                          "wsgi:balancer"], env={"PADDLER_MANAGEMENT_ADDR": f"127.0.0.1:{free_port()}"})
    assert elsewhere.popen.wait(30) != 0 and "redis://" in elsewhere.log()  # no hooks: the port clash says it
    bad = run_cli("balancer", "--state-backend", "mysql://x")
    assert bad.returncode == 2 and "--state-backend" in bad.stderr and "redis://" in bad.stderr


def test_a_balancer_killed_mid_load_gives_its_slots_back_within_the_lease_ttl(fleet: Fleet,
                                                                              redis_server: RedisServer) -> None:
    balancers, sims = shared_fleet(fleet, redis_server.url, [2, 2], tokens_per_second="20", lease_ttl="2",
                                   report_to=1)
    doomed, survivor = balancers
    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(lambda: complete(doomed, 200, stream=True, timeout=60))
        wait_until(lambda: health(survivor)["requests_in_flight"] == 4)  # the survivor sees the other's leases
        doomed.kill()
        killed = time.monotonic()
        wait_until(lambda: health(survivor)["requests_in_flight"] == 0, timeout=10)
        returned_after = time.monotonic() - killed
    assert returned_after < 2 + 3  # TTL, plus a refresh and scheduling slack
    wait_until(lambda: health(survivor)["slots_idle"] == 4)
    with ThreadPoolExecutor(4) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda _: complete(survivor, 5), range(8)))
    assert [sim_stats(s)["requests_deferred_total"] for s in sims] == [0, 0]


def test_redis_restarted_under_load(fleet: Fleet, tmp_path: Path) -> None:
    """While Redis is down, requests that need a slot wait in the buffer (a failover costs a wait, not a refusal);
    nothing hangs; after it returns (empty: no persistence) the agents refill it and every waiting request is
    served, with nothing leaked."""
    server = RedisServer(tmp_path)
    try:
        fleet.redis_url = server.url
        balancer = fleet.balancer("--workers", "1")
        sim = fleet.simulator("--parallel", "2", "--decode-tokens-per-second", "100")
        fleet.agent(sim.port, balancer.extra["management_port"], "--name", "r", interval=INTERVAL)
        wait_until(lambda: agents(balancer) and agents(balancer)[0]["state"] == "ready")
        complete(balancer, 1)
        baseline = internals(balancer)
        with background_traffic(balancer, 3, 5) as outcomes:
            wait_until(lambda: outcomes.count("200") >= 3, message="traffic flowing")
            server.stop()
            wait_until(lambda: health(balancer)["state_backend_reachable"] is False, timeout=10)
            wait_until(lambda: health(balancer)["requests_buffered"] >= 1, timeout=10, message="requests waiting")
            server.start()
            wait_until(lambda: health(balancer)["state_backend_reachable"] and health(balancer)["agents_ready"] == 1,
                       timeout=10)
            served_before = outcomes.count("200")
            wait_until(lambda: outcomes.count("200") > served_before + 3, timeout=10)
        assert set(outcomes) == {"200"}, outcomes  # no refusal, no hang, no error
        settled(balancer, baseline)
        keys = redis.Redis.from_url(server.url).keys("*")
        assert keys  # refilled by the agent's reports
    finally:
        server.stop()


def test_balancer_starts_while_redis_is_down_and_recovers(fleet: Fleet, tmp_path: Path) -> None:
    """A request waits for Redis as for a slot; one whose wait ends while Redis is still away gets 503 naming it."""
    server = RedisServer(tmp_path)
    server.stop()
    fleet.redis_url = server.url
    balancer = fleet.balancer("--buffered-request-timeout", "2")
    sim = fleet.simulator("--parallel", "1")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "late", interval=INTERVAL)
    response = complete(balancer, 1, timeout=10)
    assert response.status_code == 503 and "Redis" in response.json()["error"]["message"]
    assert response.headers["Retry-After"] == "1"
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(complete, balancer, 1, timeout=20)
            wait_until(lambda: health(balancer)["requests_buffered"] == 1, message="the request waiting")
            server.start()
            assert waiting.result().status_code == 200
    finally:
        server.stop()


def test_redis_server_is_the_debian_package() -> None:
    """The tests run the real thing; scripts/system-packages.sh installs it."""
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("Redis server v=")


def test_leases_of_long_streams_are_renewed(fleet: Fleet, redis_server: RedisServer) -> None:
    """A stream that outlives --lease-ttl keeps its slot: the next request waits in the balancer, not in llama.cpp."""
    fleet.redis_url = redis_server.url
    prefix = f"t{uuid.uuid4().hex[:12]}"
    balancer = fleet.balancer("--lease-ttl", "1", "--buffered-request-timeout", "30", prefix=prefix)
    sim = fleet.simulator("--parallel", "1", "--decode-tokens-per-second", "20")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "one", interval=INTERVAL)
    wait_until(lambda: agents(balancer) and agents(balancer)[0]["state"] == "ready")
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(complete, balancer, 60, True, 30)  # 3 s, three lease TTLs
        wait_until(lambda: health(balancer)["requests_in_flight"] == 1)
        client = redis.Redis.from_url(redis_server.url)
        [leases] = client.keys(f"{prefix}:leases:*")
        [(_, first_expiry)] = client.zrange(leases, 0, -1, withscores=True)
        wait_until(lambda: (client.zrange(leases, 0, -1, withscores=True) or [(0, 0)])[0][1] > first_expiry + 2000,
                   timeout=10, message="the lease renewed past two TTLs")
        assert client.zcard(leases) == 1  # two TTLs on, the lease is alive
        second = pool.submit(complete, balancer, 2)
        wait_until(lambda: health(balancer)["requests_buffered"] == 1)
        assert health(balancer)["requests_in_flight"] == 1
        assert long.result().status_code == 200 and second.result().status_code == 200
    assert sim_stats(sim)["requests_deferred_total"] == 0


def test_releases_wake_the_other_workers_only_while_one_has_waiters(redis_server: RedisServer) -> None:
    prefix = f"w{uuid.uuid4().hex[:10]}"
    releasing, waiting = (Ledger(store=RedisStore(redis_server.url, prefix, lease_ttl=60)) for _ in range(2))
    releasing.report("s", "10.0.0.1:1", 2, 0, True)
    subscriber = redis.Redis.from_url(redis_server.url).pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(f"{prefix}:capacity")

    def messages_after_a_release() -> list[str]:
        releasing.give_back(releasing.reserve())
        seen = []
        while (message := subscriber.get_message(timeout=0.3)) is not None:
            seen.append(message["data"])
        return seen

    assert messages_after_a_release() == []  # nobody waits: nobody is woken
    waiting.store.mark_waiting(True)  # what drawing a ticket does to its worker
    assert messages_after_a_release() == [b"release"]
    waiting.store.mark_waiting(False)  # (in life the mark expires WAITING_MARK_TTL after the last waiter)
    assert messages_after_a_release() == []
    subscriber.close()


def test_the_queue_is_fifo_across_workers_and_skips_dead_ones(redis_server: RedisServer) -> None:
    prefix = f"q{uuid.uuid4().hex[:10]}"
    a, b, c = (Ledger(store=RedisStore(redis_server.url, prefix, lease_ttl=60)) for _ in range(3))
    a.report("s", "10.0.0.1:1", 1, 0, True)
    for ledger in (b, c):
        ledger.refresh()
    running = a.reserve()
    older, newer = a.take_ticket(), b.take_ticket()
    a.give_back(running)
    b.refresh()
    assert b.reserve(ticket=newer) is None  # the older request, on the other worker, goes first
    assert b.reserve() is None  # and a new arrival does not jump the queue
    served = a.reserve(ticket=older)
    assert served is not None
    a.give_back(served)
    b.refresh()
    served = b.reserve(ticket=newer)
    assert served is not None
    b.give_back(served)

    dead, alive = c.take_ticket(), b.take_ticket()
    c.store.mark_waiting(False)  # c died: its mark is gone (in life it expires after WAITING_MARK_TTL)
    assert dead.name.startswith(c.store.worker_id)
    assert b.reserve(ticket=alive) is not None  # a dead worker's waiter does not block the queue


def test_a_server_removed_while_its_requests_run_keeps_their_leases(redis_server: RedisServer) -> None:
    """An agent silent for a while (its balancer restarting) is removed while another balancer's requests still run
    on its server. When it reports again, those requests are still leases: were they counted as someone else's
    load from the agent's reading instead, a take on one balancer between that reading and its arrival on the other
    would be missing from both, and llama.cpp would get one request more than it has slots."""
    prefix = f"r{uuid.uuid4().hex[:10]}"
    running_here, hearing = (Ledger(store=RedisStore(redis_server.url, prefix, lease_ttl=60)) for _ in range(2))
    hearing.report("s", "10.0.0.1:1", 2, 0, True)
    running_here.refresh()
    running = running_here.reserve()
    assert running is not None
    assert hearing.remove_if_silent("s", reported_before=hearing.clock() + 1)
    hearing.report("s", "10.0.0.1:1", 2, 1, True)  # back: the agent reads the running request
    running_here.refresh()
    reading = 1  # the agent reads /slots again: one busy ...
    taken_meanwhile = running_here.reserve()  # ... and a request starts on the other balancer before it lands
    assert taken_meanwhile is not None
    hearing.report("s", "10.0.0.1:1", 2, reading, True)
    running_here.refresh()
    assert hearing.reserve() is None and running_here.reserve() is None  # both slots are running


def test_a_ticket_survives_redis_losing_its_data(redis_server: RedisServer) -> None:
    prefix = f"q{uuid.uuid4().hex[:10]}"
    a, b = (Ledger(store=RedisStore(redis_server.url, prefix, lease_ttl=60)) for _ in range(2))
    a.report("s", "10.0.0.1:1", 1, 0, True)
    first, second = a.take_ticket(), b.take_ticket()
    client = redis.Redis.from_url(redis_server.url)
    for key in client.keys(f"{prefix}:*"):
        client.delete(key)  # what a restarted Redis without persistence looks like
    a.report("s", "10.0.0.1:1", 1, 0, True)  # the agents refill it
    b.refresh()
    with pytest.raises(TicketLost):  # never put back by the waiter (it could be returned at that moment)
        b.reserve(ticket=second)
    first, second = a.take_ticket(), b.take_ticket()  # the buffer draws new ones, in its own order
    assert b.reserve(ticket=second) is None
    assert a.reserve(ticket=first) is not None


def test_one_balancer_with_two_workers_serves_in_arrival_order(fleet: Fleet, redis_server: RedisServer) -> None:
    fleet.redis_url = redis_server.url
    balancer = fleet.balancer("--workers", "2", "--buffered-request-timeout", "60")
    sim = fleet.simulator("--parallel", "1", "--decode-tokens-per-second", "50")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "one", interval=INTERVAL)
    wait_until(lambda: agents(balancer) and agents(balancer)[0]["state"] == "ready")
    finished: list[int] = []
    lock = threading.Lock()

    def request(i: int) -> None:
        assert complete(balancer, 10, timeout=60).status_code == 200
        with lock:
            finished.append(i)

    threads = []
    for i in range(10):  # each one arrives while the one slot is busy, 50 ms after the previous
        thread = threading.Thread(target=request, args=(i,))
        thread.start()
        threads.append(thread)
        time.sleep(0.05)
    for thread in threads:
        thread.join(60)
    assert finished == list(range(10))
    assert sim_stats(sim)["requests_deferred_total"] == 0
    # /metrics counts the whole balancer, whichever worker answers the scrape (each counts what it relayed)
    def scraped() -> str:  # a new connection each time: SO_REUSEPORT spreads them over both workers
        return requests.get(balancer.extra["management"] + "/metrics", timeout=5, headers={"Connection": "close"}).text

    served = 'paddler_requests_total{outcome="served"} 10.0'
    wait_until(lambda: served in scraped(), message="the counts pushed to Redis (each worker pushes every second)")
    for _ in range(6):
        text = scraped()
        assert served in text and re.search(r"^paddler_queue_wait_seconds_count 10\.0$", text, re.M)
        traffic = requests.get(balancer.extra["management"] + "/api/v1/traffic", timeout=5,
                               headers={"Connection": "close"}).json()  # and so do the dashboards' figures
        assert traffic["fleet"]["requests"] == 10 and traffic["fleet"]["tokens"] == 100
        assert [s["requests"] for s in traffic["servers"]] == [10]


def test_tenant_caps_and_a_put_hold_across_every_worker_and_balancer(fleet: Fleet, redis_server: RedisServer) -> None:
    """Two balancers of two workers each, one Redis prefix, one tenants file each: the batch tenant's max_slots = 1
    holds fleet-wide (take.lua counts its leases), and a PUT on one balancer reaches both of its workers."""
    tenants = fleet.workdir / "tenants.toml"
    tenants.write_text('[tenants.batch]\nkeys = ["sk-b"]\nmax_slots = 1\n\n[tenants.chat]\nkeys = ["sk-c"]\n')
    fleet.redis_url = redis_server.url
    prefix = f"t{uuid.uuid4().hex[:12]}"
    balancers = [fleet.balancer("--workers", "2", "--tenants", str(tenants), "--buffered-request-timeout", "60",
                                "--management-token", "tok", prefix=prefix) for _ in range(2)]
    sims = [fleet.simulator("--parallel", "3", "--decode-tokens-per-second", "80") for _ in range(2)]
    for i, sim in enumerate(sims):
        fleet.agent(sim.port, balancers[i].extra["management_port"], "--name", f"s{i}", "--management-token", "tok",
                    interval=INTERVAL)
    for balancer in balancers:
        wait_until(lambda b=balancer: len(agents_with_token(b)) == 2)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], sum(sim_stats(s)["requests_processing"] for s in sims))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: requests.post(balancers[i % 2].extra["proxy"] + "/completion", timeout=60,
                                                        headers={"Authorization": "Bearer sk-b"},
                                                        json={"prompt": "x", "n_predict": 12}), range(8)))
    stop.set()
    sampler.join(5)
    assert [a.status_code for a in answers] == [200] * 8 and peak[0] == 1  # never two batch slots at once
    put = requests.put(balancers[0].extra["management"] + "/api/v1/tenants", headers={"Authorization": "Bearer tok"},
                       data='[tenants.batch]\nkeys = ["sk-new"]\n', timeout=5)
    assert put.status_code == 200

    def everywhere() -> bool:  # each new connection may land on either worker
        new_key = {"Authorization": "Bearer sk-new"}
        return all(requests.post(balancers[0].extra["proxy"] + "/completion", headers=new_key, timeout=10,
                                 json={"prompt": "x", "n_predict": 1}).status_code == 200 for _ in range(8))

    wait_until(everywhere, message="the new tenants in both workers")
    assert "Traceback" not in balancers[0].log()


def agents_with_token(balancer: Proc) -> list[dict]:
    return requests.get(balancer.extra["management"] + "/api/v1/agents", headers={"Authorization": "Bearer tok"},
                        timeout=5).json()["agents"]
