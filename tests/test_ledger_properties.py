"""Property tests: random interleavings of report / reserve / release / disconnect / remove / quarantine.

After every step: no counter is negative, in-flight counts equal the reservations really held, free
slots never exceed the total, a reservation is refused only when no server has a free slot, the
chosen server has the most free slots, and once everything is released nothing has leaked.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from paddler_sync.fleet.ledger import Ledger, Reservation

KEYS = st.sampled_from(["a", "b", "c", "d"])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LedgerMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.ledger = Ledger(clock=self.clock)
        self.held: list[Reservation] = []
        self.wakeups = 0
        self.ledger.on_capacity(self._woken)

    def _woken(self) -> None:
        self.wakeups += 1

    @rule(key=KEYS, total=st.integers(0, 6), processing=st.integers(0, 8), routable=st.booleans(),
          port=st.sampled_from([1, 2]))
    def report(self, key: str, total: int, processing: int, routable: bool, port: int) -> None:
        self.ledger.report(key, f"10.0.0.1:{port}{ord(key)}", total, min(processing, total), routable)

    @rule(target=reservations)
    def reserve(self) -> Reservation | None:
        now = self.clock()
        best_free = max((u.free(now) for u in self.ledger.upstreams()), default=0)
        reservation = self.ledger.reserve()
        if best_free == 0:
            assert reservation is None
            return None
        assert reservation is not None
        assert reservation.upstream.free(now) + 1 == best_free  # it took from a server with the most free slots
        self.held.append(reservation)
        return reservation

    @rule(reservation=consumes(reservations), draining=st.booleans())
    def release(self, reservation: Reservation | None, draining: bool) -> None:
        if reservation is None:
            return
        self.ledger.release(reservation, draining=draining)
        assert not self.ledger.release(reservation)  # a second release changes nothing
        self.held.remove(reservation)

    @rule(key=KEYS)
    def remove(self, key: str) -> None:
        self.ledger.remove(key)

    @rule(key=KEYS, seconds=st.floats(0.1, 5))
    def quarantine(self, key: str, seconds: float) -> None:
        self.ledger.quarantine(key, seconds)

    @rule(seconds=st.floats(0, 3))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds
        self.ledger.lift_expired_quarantines()

    @precondition(lambda self: not self.held)
    @rule()
    def everything_released_and_reported_idle_leaks_nothing(self) -> None:
        for upstream in list(self.ledger.upstreams()):
            self.ledger.report(upstream.key, upstream.addr, upstream.total, 0, True)
        now = self.clock()
        for upstream in self.ledger.upstreams():
            assert upstream.in_flight == 0
            assert upstream.free(now) == upstream.total

    @invariant()
    def counters_are_exact_and_never_negative(self) -> None:
        now = self.clock()
        for upstream in self.ledger.upstreams():
            held_here = sum(1 for r in self.held if r.upstream is upstream and not r.released)
            assert upstream.in_flight == held_here
            assert upstream.external >= 0 and upstream.draining >= 0
            assert 0 <= upstream.free(now) <= upstream.total
            assert 0 <= upstream.busy <= upstream.total


LedgerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestLedger = LedgerMachine.TestCase


def test_a_released_slot_on_a_replaced_server_is_not_given_to_the_new_one() -> None:
    ledger = Ledger(clock=lambda: 0.0)
    ledger.report("a", "10.0.0.1:1", 1, 0, True)
    reservation = ledger.reserve()
    ledger.remove("a")
    ledger.report("a", "10.0.0.1:1", 1, 1, True)  # registered again, its one slot busy
    assert ledger.release(reservation) is False
    assert ledger.free_slots() == 0


def test_ties_go_to_fewer_in_flight_then_the_lower_address() -> None:
    ledger = Ledger(clock=lambda: 0.0)
    ledger.report("b", "10.0.0.2:1", 2, 0, True)
    ledger.report("a", "10.0.0.1:1", 2, 0, True)
    first = ledger.reserve()
    second = ledger.reserve()
    assert (first.addr, second.addr) == ("10.0.0.1:1", "10.0.0.2:1")  # equal servers fill in turn


def test_a_sleeping_server_gets_requests_only_when_no_awake_server_has_a_free_slot() -> None:
    from paddler_sync.fleet.ledger import Ledger

    ledger = Ledger(clock=lambda: 0.0)
    ledger.report("sleepy", "10.0.0.1:1", total=4, processing=0, routable=True, sleeping=True)
    ledger.report("awake", "10.0.0.2:1", total=1, processing=0, routable=True)
    first = ledger.reserve()
    assert first is not None and first.upstream.key == "awake"
    second = ledger.reserve()
    assert second is not None and second.upstream.key == "sleepy"
    assert ledger.pick_without_slot().upstream.key == "awake"
