"""Property tests: random interleavings of report / reserve / release / disconnect / remove / quarantine.

Servers serve model m1, m2, or (a router's entry) m1 only when named; requests name m1, m2 or none.
After every step: no counter is negative, in-flight counts equal the reservations really held, free
slots never exceed the total, a reservation goes only to a server of its model and is refused only
when no such server has a free slot, the chosen server has the most free slots among them, and once
everything is released nothing has leaked.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.slots import GiveBack, Reservation
from paddler_sync.protocol.models import Serving
from tests.fakes import Clock

KEYS = st.sampled_from(["a", "b", "c", "d"])
SERVINGS = st.sampled_from([Serving("m1", frozenset({"m1"})), Serving("m2", frozenset({"m2", "alias2"})),
                            Serving("m1", frozenset({"m1"}), needs_model=True), Serving()])
ASKED = st.sampled_from(["m1", "m2", "alias2", None])


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
          port=st.sampled_from([1, 2]), serving=SERVINGS)
    def report(self, key: str, total: int, processing: int, routable: bool, port: int, serving: Serving) -> None:
        self.ledger.report(key, f"10.0.0.1:{port}{ord(key)}", total, min(processing, total), routable,
                           serving=serving)

    @rule(target=reservations, model=ASKED)
    def reserve(self, model: str | None) -> Reservation | None:
        now = self.clock()
        best_free = max((u.free(now) for u in self.ledger.upstreams() if u.serving.serves(model)), default=0)
        reservation = self.ledger.reserve(model=model)
        if best_free == 0:
            assert reservation is None
            return None
        assert reservation is not None and reservation.upstream.serving.serves(model)
        assert reservation.upstream.free(now) + 1 == best_free  # it took from a server with the most free slots
        self.held.append(reservation)
        return reservation

    @rule(reservation=consumes(reservations), draining=st.booleans())
    def release(self, reservation: Reservation | None, draining: bool) -> None:
        if reservation is None:
            return
        self.ledger.give_back(reservation, GiveBack.BROKE_OFF if draining else GiveBack.ANSWERED)
        assert not self.ledger.give_back(reservation)  # a second release changes nothing
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
            self.ledger.report(upstream.key, upstream.addr, upstream.total, 0, True, serving=upstream.serving)
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
            assert upstream.external >= 0 and upstream.lingering >= 0
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
    assert ledger.give_back(reservation) is False
    assert ledger.free_slots() == 0


def test_ties_go_to_fewer_in_flight_then_the_lower_address() -> None:
    ledger = Ledger(clock=lambda: 0.0)
    ledger.report("b", "10.0.0.2:1", 2, 0, True)
    ledger.report("a", "10.0.0.1:1", 2, 0, True)
    first = ledger.reserve()
    second = ledger.reserve()
    assert (first.addr, second.addr) == ("10.0.0.1:1", "10.0.0.2:1")  # equal servers fill in turn


def test_a_sleeping_server_gets_requests_only_when_no_awake_server_has_a_free_slot() -> None:
    from paddler_sync.ledger.ledger import Ledger

    ledger = Ledger(clock=lambda: 0.0)
    ledger.report("sleepy", "10.0.0.1:1", total=4, processing=0, routable=True, sleeping=True)
    ledger.report("awake", "10.0.0.2:1", total=1, processing=0, routable=True)
    first = ledger.reserve()
    assert first is not None and first.upstream.key == "awake"
    second = ledger.reserve()
    assert second is not None and second.upstream.key == "sleepy"
    assert ledger.pick_without_slot().upstream.key == "awake"


class LateReportsMachine(RuleBasedStateMachine):
    """One llama.cpp server with other clients' load too, and reports that arrive after requests moved on.

    The agent reads /slots (the truth at that moment) and its report lands later, after any number of
    takes, releases and changes of other clients' load. Whatever the interleaving, a report leaves the
    ledger's external load equal to what it truly was when /slots was read: a request of ours that ended
    (or started) meanwhile is not mistaken for someone else's. So while no other load changed since the
    last reading, a slot is taken only where one is truly free (no request queues inside llama.cpp), and
    none stays hidden."""

    TOTAL = 4

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.ledger = Ledger(clock=self.clock)
        self.external = 0  # the truth: busy slots that are not this balancer's
        self.held: list[Reservation] = []
        self.reading: tuple[float, int, int] | None = None  # (when read, busy then, external then): in transit
        self.known_external: int | None = 0  # what the last report taught, while still true
        self.ledger.report("s", "10.0.0.1:1", self.TOTAL, 0, True)

    def tick(self) -> None:
        self.clock.now += 0.001

    @rule()
    def take(self) -> None:
        self.tick()
        truly_free = self.TOTAL - len(self.held) - self.external
        reservation = self.ledger.reserve()
        if self.known_external == self.external:
            assert (reservation is not None) == (truly_free > 0)
        if reservation is not None:
            self.held.append(reservation)

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 10))
    def release(self, index: int) -> None:
        self.tick()
        self.ledger.give_back(self.held.pop(index % len(self.held)))

    @rule(delta=st.integers(-2, 2))
    def other_clients_load_changes(self, delta: int) -> None:
        self.tick()
        room = self.TOTAL - len(self.held) - self.external
        self.external = max(0, self.external + min(delta, room))

    @rule()
    def agent_reads_slots(self) -> None:
        self.tick()
        self.reading = (self.clock.now, len(self.held) + self.external, self.external)

    @precondition(lambda self: self.reading is not None)
    @rule()
    def report_arrives(self) -> None:
        self.tick()
        read_at, busy, external_then = self.reading
        self.reading = None
        self.ledger.report("s", "10.0.0.1:1", self.TOTAL, busy, True, sampled_at=read_at)
        assert self.ledger.get("s").external == external_then
        self.known_external = external_then


LateReportsMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestLateReports = LateReportsMachine.TestCase


def test_a_request_that_ended_before_the_report_arrived_frees_its_slot_at_once() -> None:
    clock = Clock()
    ledger = Ledger(clock=clock)
    ledger.report("s", "10.0.0.1:1", 2, 0, True)
    first, _second = ledger.reserve(), ledger.reserve()
    read_at = clock.now  # the agent reads /slots: both busy
    clock.now += 0.004
    ledger.give_back(first)  # one ends while the report travels
    clock.now += 0.004
    ledger.report("s", "10.0.0.1:1", 2, 2, True, sampled_at=read_at)
    assert ledger.free_slots() == 1  # not hidden as "external" load until the next report
