"""One contract, both slot stores: every store operation, through the ledger, answers the same in-process, in one
Redis and in a Redis Cluster (three masters, three replicas). What only a shared store does (leases that expire, a
queue across workers) is in test_shared_ledger.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import gevent
import pytest
from gevent.pool import Group
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paddler_sync.ledger.buffer import RequestBuffer
from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.slots import GiveBack, Reservation
from paddler_sync.ledger.stores.local import LocalStore
from paddler_sync.ledger.stores.redis.store import RedisStore
from paddler_sync.protocol.models import Serving
from tests.fakes import Clock
from tests.helpers import RedisServer
from tests.redis_cluster import RedisClusterSet


@pytest.fixture(params=["local", "redis", "cluster"])
def ledger(request: pytest.FixtureRequest) -> Iterator[Ledger]:
    clock = Clock()
    if request.param == "local":
        yield Ledger(store=LocalStore(), clock=clock)
        return
    server: RedisServer | RedisClusterSet = request.getfixturevalue(
        "redis_server" if request.param == "redis" else "redis_cluster")
    store = RedisStore(server.url, f"c{uuid.uuid4().hex[:10]}", lease_ttl=60)
    yield Ledger(store=store, clock=clock)
    store.client.close()


def free(ledger: Ledger, key: str = "a") -> int:
    upstream = ledger.get(key)
    return upstream.free(ledger.clock()) if upstream else 0


def test_take_until_full_then_release(ledger: Ledger) -> None:
    ledger.report("a", "10.0.0.1:1", total=2, processing=0, routable=True)
    first, second = ledger.reserve(), ledger.reserve()
    assert first is not None and second is not None and free(ledger) == 0
    assert ledger.reserve() is None  # full: never beyond the free slots
    assert ledger.give_back(first) is True and free(ledger) == 1
    assert ledger.give_back(first) is False and free(ledger) == 1  # a second release changes nothing
    assert ledger.in_flight() == 1


def test_a_report_counts_what_others_run(ledger: Ledger) -> None:
    ledger.report("a", "10.0.0.1:1", total=4, processing=0, routable=True)
    mine = ledger.reserve()
    ledger.report("a", "10.0.0.1:1", total=4, processing=3, routable=True)  # mine, and two of someone else's
    upstream = ledger.get("a")
    assert upstream is not None and (upstream.in_flight, upstream.external) == (1, 2) and free(ledger) == 1
    ledger.give_back(mine)
    assert free(ledger) == 2


def test_a_draining_slot_stays_busy_until_the_next_report(ledger: Ledger) -> None:
    ledger.report("a", "10.0.0.1:1", total=1, processing=0, routable=True)
    reservation = ledger.reserve()
    ledger.give_back(reservation, GiveBack.BROKE_OFF)
    assert free(ledger) == 0 and ledger.reserve() is None
    ledger.report("a", "10.0.0.1:1", total=1, processing=0, routable=True)  # llama.cpp stopped it
    assert free(ledger) == 1


def test_unusable_and_quarantined_servers_take_nothing(ledger: Ledger) -> None:
    ledger.report("a", "10.0.0.1:1", total=2, processing=0, routable=False)
    assert ledger.reserve() is None
    ledger.report("a", "10.0.0.1:1", total=2, processing=0, routable=True)
    assert ledger.quarantine("a", 5.0) == ledger.clock() + 5.0
    assert ledger.reserve() is None
    ledger.clock.now += 6  # type: ignore[attr-defined]
    assert ledger.lift_expired_quarantines() == ["a"]
    assert ledger.reserve() is not None


def test_a_ready_report_lifts_a_quarantine(ledger: Ledger) -> None:
    ledger.report("a", "10.0.0.1:1", total=1, processing=0, routable=True)
    ledger.quarantine("a", 60.0)
    ledger.report("a", "10.0.0.1:1", total=1, processing=0, routable=True)
    assert ledger.reserve() is not None


def test_removal_and_a_new_address_make_old_reservations_inert(ledger: Ledger) -> None:
    ledger.report("a", "10.0.0.1:1", total=1, processing=0, routable=True)
    old = ledger.reserve()
    ledger.report("a", "10.0.0.2:1", total=1, processing=0, routable=True)  # the key now names another server
    assert free(ledger) == 1
    assert ledger.reserve() is not None
    ledger.give_back(old)  # the old server's slot: nothing of the new one's changes
    assert free(ledger) == 0
    assert ledger.remove("a") is not None and ledger.get("a") is None and ledger.reserve() is None


def test_remove_if_silent_spares_a_server_heard_from_since(ledger: Ledger) -> None:
    ledger.report("a", "10.0.0.1:1", total=1, processing=0, routable=True)
    assert ledger.remove_if_silent("a", reported_before=ledger.clock() - 1) is False
    assert ledger.get("a") is not None
    assert ledger.remove_if_silent("a", reported_before=ledger.clock() + 1) is True
    assert ledger.get("a") is None


def test_a_waiter_with_its_ticket_is_served_and_leaving_gives_its_place_back(ledger: Ledger) -> None:
    ledger.report("a", "10.0.0.1:1", total=1, processing=0, routable=True)
    ticket = ledger.take_ticket()
    served = ledger.reserve(ticket=ticket)
    assert served is not None
    ledger.give_back(served)
    other = ledger.take_ticket()
    ledger.return_ticket(other)
    assert ledger.reserve() is not None  # a ticket given back holds nobody up


def test_refresh_mirrors_a_shared_store_and_is_a_no_op_in_process(ledger: Ledger) -> None:
    ledger.report("a", "10.0.0.1:1", total=3, processing=1, routable=True, record='{"x": 1}')
    records = ledger.refresh()
    upstream = ledger.get("a")
    assert upstream is not None and (upstream.total, upstream.external) == (3, 1) and free(ledger) == 2
    if isinstance(ledger.store, LocalStore):
        assert records is None
    else:
        assert records == {"a": '{"x": 1}'}


# --- per-model queues: random interleavings of arrivals and freed slots, on both stores ----------------------

MODELS = st.sampled_from(["a", "b", None])
STEPS = st.lists(st.tuples(st.sampled_from(["arrive", "arrive", "free"]), MODELS), min_size=1, max_size=25)


def fresh_ledger(backend: str, request: pytest.FixtureRequest) -> Ledger:
    if backend == "local":
        return Ledger(store=LocalStore(), clock=Clock())
    server: RedisServer = request.getfixturevalue("redis_server")
    return Ledger(store=RedisStore(server.url, f"q{uuid.uuid4().hex[:10]}", lease_ttl=60), clock=Clock())


@pytest.mark.parametrize("backend", ["local", "redis"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS)
def test_each_model_keeps_its_own_fifo_and_never_waits_behind_another(backend: str, steps: list,
                                                                      request: pytest.FixtureRequest) -> None:
    """Two single-slot servers, one per model (both take requests that name none). Whatever the interleaving: a
    request goes only to a server of its model; each model's waiters get slots in arrival order; and after every
    step nobody waits for a model whose server has a free slot (a queue for one model never blocks another)."""
    ledger = fresh_ledger(backend, request)
    ledger.report("sa", "10.0.0.1:1", 1, 0, True, serving=Serving("a", frozenset({"a"})))
    ledger.report("sb", "10.0.0.1:2", 1, 0, True, serving=Serving("b", frozenset({"b"})))
    buffer = RequestBuffer(ledger, max_waiting=100, timeout=30)
    arrivals: dict[str | None, list[int]] = {"a": [], "b": [], None: []}
    served: dict[str | None, list[int]] = {"a": [], "b": [], None: []}
    held: list[Reservation] = []

    def arrive(number: int, model: str | None) -> None:
        reservation, _ = buffer.acquire(model=model)
        assert reservation.upstream.serving.serves(model)
        served[model].append(number)
        held.append(reservation)

    group = Group()
    try:
        for number, (step, model) in enumerate(steps):
            if step == "arrive":
                arrivals[model].append(number)
                group.spawn(arrive, number, model)
            elif held:
                ledger.give_back(held.pop(0))
            gevent.sleep(0.005 if backend == "redis" else 0)
            for key in ("a", "b", None):
                assert served[key] == arrivals[key][:len(served[key])], f"{key}: not first come, first served"
            waiting = buffer.waiting_by_model()
            for model_name, count in waiting.items():
                if count:
                    assert all(u.free(ledger.clock()) == 0 for u in ledger.candidates(model_name)), \
                        f"a request for {model_name} waits while its server has a free slot"
    finally:
        group.kill()
        buffer.close("test over")
