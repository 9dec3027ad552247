"""The request buffer, driven in-process with gevent greenlets (no monkey-patching needed). Nothing here waits on the
wall clock: greenlets are run until the condition a test waits for holds (``settle``), and the early hand-over's
moments come from a clock the test moves."""

from __future__ import annotations

from collections.abc import Callable

import gevent
import pytest

from paddler_sync.ledger.buffer import RequestBuffer
from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.refusals import BufferFull, BufferTimeout, ClientGone
from tests.fakes import Clock, FakeWatch

TURNS = 1000  # greenlet switches a condition may take to come true


def make(max_waiting: int = 10, timeout: float = 5.0) -> tuple[Ledger, RequestBuffer]:
    ledger = Ledger()
    return ledger, RequestBuffer(ledger, max_waiting, timeout)


def settle(condition: Callable[[], bool]) -> None:
    """Let the other greenlets run until ``condition`` holds (it must, within TURNS switches)."""
    for _ in range(TURNS):
        if condition():
            return
        gevent.sleep(0)
    assert condition(), "the condition never held"


def let_run() -> None:
    """Let every other greenlet run until none has anything left to do now: to show that something does *not*
    happen."""
    for _ in range(TURNS):
        gevent.sleep(0)


def test_waiters_are_served_in_arrival_order_one_slot_each() -> None:
    ledger, buffer = make()
    ledger.report("a", "10.0.0.1:1", 1, 0, True)
    held, _ = buffer.acquire()
    order: list[int] = []

    def wait(i: int) -> None:
        reservation, waited = buffer.acquire()
        order.append(i)
        assert waited > 0
        gevent.sleep(0)  # the slot stays taken while the others get their turn
        ledger.give_back(reservation)

    greenlets = [gevent.spawn(wait, i) for i in range(5)]
    settle(lambda: buffer.waiting == 5)
    ledger.give_back(held)
    gevent.joinall(greenlets, timeout=3, raise_error=True)
    assert order == [0, 1, 2, 3, 4]
    assert ledger.in_flight() == 0 and buffer.waiting == 0


def test_one_freed_slot_wakes_exactly_one_waiter() -> None:
    ledger, buffer = make()
    ledger.report("a", "10.0.0.1:1", 1, 0, True)
    held, _ = buffer.acquire()
    served: list[int] = []
    greenlets = [gevent.spawn(lambda i=i: served.append((i, buffer.acquire()))) for i in range(3)]
    settle(lambda: buffer.waiting == 3)
    ledger.give_back(held)
    settle(lambda: len(served) == 1)
    let_run()  # everyone runs again: nobody else got the one slot
    assert [i for i, _ in served] == [0] and buffer.waiting == 2
    gevent.killall(greenlets)
    assert buffer.waiting == 0


def test_a_new_arrival_never_overtakes_a_waiter() -> None:
    ledger, buffer = make()
    ledger.report("a", "10.0.0.1:1", 1, 1, True)  # the only slot is busy with outside load
    first = gevent.spawn(buffer.acquire)
    settle(lambda: buffer.waiting == 1)
    ledger.report("a", "10.0.0.1:1", 1, 0, True)  # the report frees it: the waiter gets it, not a newcomer
    newcomer = gevent.spawn(buffer.acquire)
    reservation, _ = first.get(timeout=1)
    let_run()
    assert reservation.upstream.in_flight == 1
    assert not newcomer.ready() and buffer.waiting == 1
    newcomer.kill()


def test_full_queue_and_zero_buffer_refuse_at_once() -> None:
    _, buffer = make(max_waiting=1)
    waiter = gevent.spawn(buffer.acquire)
    settle(lambda: buffer.waiting == 1)
    with pytest.raises(BufferFull):
        buffer.acquire()
    waiter.kill()
    _, off = make(max_waiting=0)
    with pytest.raises(BufferFull, match="buffering is off"):
        off.acquire()


def test_waiting_times_out_and_takes_nothing() -> None:
    ledger, buffer = make(timeout=0.01)
    with pytest.raises(BufferTimeout) as refused:
        buffer.acquire()
    assert buffer.waiting == 0 and refused.value.waited >= 0.01
    ledger.report("a", "10.0.0.1:1", 1, 0, True)
    assert ledger.free_slots() == 1


def test_a_client_that_leaves_while_waiting_takes_nothing() -> None:
    _, buffer = make()
    watch = FakeWatch()
    waiter = gevent.spawn(buffer.acquire, watch)
    settle(lambda: watch.on_gone is not None)
    assert watch.on_gone is not None
    watch.on_gone()
    with pytest.raises(ClientGone):
        waiter.get(timeout=2)
    assert buffer.waiting == 0 and watch.stopped  # (counted once, by the metrics, as client_gone)
    assert waiter.exception.ending == "client_gone" and waiter.exception.waited > 0


def test_a_killed_waiter_takes_nothing_and_a_served_one_owns_its_slot() -> None:
    ledger, buffer = make()
    ledger.report("a", "10.0.0.1:1", 1, 1, True)
    killed = gevent.spawn(buffer.acquire)
    served = gevent.spawn(buffer.acquire)
    settle(lambda: buffer.waiting == 2)
    killed.kill()  # e.g. the worker shuts down
    assert buffer.waiting == 1
    ledger.report("a", "10.0.0.1:1", 1, 0, True)
    reservation, _ = served.get(timeout=1)
    assert ledger.in_flight() == 1
    ledger.give_back(reservation)
    assert ledger.in_flight() == 0 and ledger.free_slots() == 1


def test_early_hand_over_sends_one_waiter_just_before_a_slot_is_due_to_free() -> None:
    """--early-dispatch: one request more per server, a moment before a running one should end; never two. The
    moments are on the ledger's clock, moved here by hand; the buffer's own timer would call dispatch() then."""
    clock = Clock()
    ledger = Ledger(early_lead=0.05, clock=clock)
    buffer = RequestBuffer(ledger, 10, 5.0)
    ledger.report("a", "10.0.0.1:1", 1, 0, True)
    running, _ = buffer.acquire()
    ledger.expect_end(running, clock.now + 0.3)
    results: list = []
    waiters = [gevent.spawn(lambda: results.append(buffer.acquire())) for _ in range(2)]
    settle(lambda: buffer.waiting == 2)
    clock.now += 0.1
    buffer.dispatch()
    let_run()
    assert buffer.waiting == 2 and not results  # not due yet: nothing is sent to the full server
    clock.now += 0.15  # 0.05 s before the running request's end: the oldest waiter goes
    buffer.dispatch()
    settle(lambda: len(results) == 1)
    assert len(results) == 1 and results[0][0].early and buffer.waiting == 1
    assert ledger.get("a").overbooked == 1
    ledger.expect_end(results[0][0], clock.now + 0.3)
    clock.now += 0.1
    buffer.dispatch()
    let_run()
    assert buffer.waiting == 1  # at most one request waits inside llama.cpp per server
    ledger.give_back(running)  # its slot frees: the early one runs in it; the second waits for a free slot
    assert ledger.get("a").overbooked == 0 and ledger.free_slots() == 0 and buffer.waiting == 1
    ledger.give_back(results[0][0])
    gevent.joinall(waiters, timeout=2, raise_error=True)
    assert len(results) == 2 and not results[1][0].early


def test_without_early_hand_over_a_full_server_gets_nothing_whatever_is_due() -> None:
    ledger, buffer = make(timeout=0.3)
    ledger.report("a", "10.0.0.1:1", 1, 0, True)
    running, _ = buffer.acquire()
    ledger.expect_end(running, ledger.clock())
    with pytest.raises(BufferTimeout):
        buffer.acquire()
    assert ledger.next_early_chance() is None


def test_early_hand_over_never_spins_on_a_server_that_cannot_take_one() -> None:
    """A foreseen end that has passed, on a server that is not usable: no timer loop while a request waits."""
    ledger = Ledger(early_lead=0.05)
    buffer = RequestBuffer(ledger, 10, 0.3)
    ledger.report("a", "10.0.0.1:1", 1, 0, True)
    running, _ = buffer.acquire()
    ledger.expect_end(running, ledger.clock() - 1.0)
    ledger.report("a", "10.0.0.1:1", 1, 1, False)  # its agent now says it cannot serve
    rounds = 0
    original = buffer._dispatch_round

    def counted() -> None:
        nonlocal rounds
        rounds += 1
        original()

    buffer._dispatch_round = counted  # type: ignore[method-assign]
    with pytest.raises(BufferTimeout):
        buffer.acquire()
    assert rounds < 10, rounds
