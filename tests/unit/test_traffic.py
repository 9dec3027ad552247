"""The dashboards' traffic figures: rates, percentiles within their bin width, errors by kind, bounded memory."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paddler_sync.endings import Ending
from paddler_sync.traffic import BIN_GROWTH, RANGES, Traffic, bin_of, error_kind, percentile

T0 = 1_800_000_000.0


def test_rates_percentiles_and_errors_per_server_and_fleet() -> None:
    traffic = Traffic(T0)
    for i in range(100):  # 100 requests over 100 s on two servers; waits of 0..99 ms
        traffic.request_done("a:1" if i % 4 else "b:2", 200, Ending.DONE, i / 1000, 0.2, 10, T0 + i)
    traffic.request_done(None, 504, Ending.TIMED_OUT, 10.0, None, None, T0 + 100)
    traffic.request_done("a:1", 500, Ending.DONE, 0.0, None, None, T0 + 100)
    summary = traffic.summary("5m", T0 + 100.5)
    fleet = summary["fleet"]
    assert fleet["requests"] == 102 and fleet["requests_per_second"] == pytest.approx(102 / 100.5)
    assert fleet["tokens"] == 1000 and fleet["tokens_per_second"] == pytest.approx(1000 / 100.5)
    assert fleet["errors"] == {Ending.TIMED_OUT: 1, "llamacpp_500": 1}
    assert 0.2 <= fleet["ttft_p50_seconds"] <= 0.2 * BIN_GROWTH
    assert 0.094 <= fleet["queue_wait_p95_seconds"] <= 0.1 * BIN_GROWTH
    assert summary["servers"]["b:2"]["requests"] == 25 and summary["servers"]["a:1"]["requests"] == 76
    assert summary["servers"]["a:1"]["errors"] == {"llamacpp_500": 1}  # a queue timeout belongs to no server


def test_the_wait_of_a_timed_out_request_counts() -> None:
    traffic = Traffic(T0)
    traffic.request_done(None, 504, Ending.TIMED_OUT, 10.0, None, None, T0 + 1)
    assert traffic.summary("5m", T0 + 2)["fleet"]["queue_wait_p95_seconds"] >= 10.0


def test_old_traffic_leaves_the_short_range_and_silent_servers_are_forgotten() -> None:
    traffic = Traffic(T0)
    traffic.request_done("a:1", 200, Ending.DONE, 0.0, 0.1, 5, T0)
    later = T0 + 301
    assert traffic.summary("5m", later)["fleet"]["requests"] == 0
    assert traffic.summary("1h", later)["fleet"]["requests"] == 1
    traffic.sample(0, 4, 0, T0 + 3599)
    assert "a:1" in traffic.servers
    traffic.sample(0, 4, 0, T0 + 3700)
    assert "a:1" not in traffic.servers


def test_series_covers_the_range_with_peaks_and_nothing_before_start() -> None:
    traffic = Traffic(T0 + 100)
    traffic.sample(1, 4, 0, T0 + 100.1)
    traffic.sample(4, 4, 3, T0 + 100.5)  # the peak within the second is kept
    traffic.sample(2, 4, 1, T0 + 100.9)
    traffic.request_done("a:1", 200, Ending.DONE, 0.0, 0.1, 30, T0 + 100.2)
    series = traffic.series("5m", T0 + 101)
    assert len(series) == RANGES["5m"][0]
    point = next(p for p in series if p["at"] == T0 + 100)
    assert (point["slots_busy"], point["slots_total"], point["waiting"]) == (4, 4, 3)
    assert point["tokens_per_second"] == 30 and point["requests_per_second"] == 1
    assert series[0]["requests_per_second"] is None and series[0]["slots_busy"] is None  # before start
    assert series[-1]["requests_per_second"] == 0.0  # after start, a quiet second is 0


def test_error_kinds() -> None:
    assert error_kind(200, Ending.DONE) is None
    assert error_kind(400, Ending.DONE) == "llamacpp_400"
    assert error_kind(429, Ending.QUEUE_FULL) == Ending.QUEUE_FULL
    assert error_kind(200, Ending.CLIENT_GONE) == Ending.CLIENT_GONE
    assert error_kind(502, Ending.UPSTREAM_ERROR) == Ending.UPSTREAM_ERROR


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=3000, allow_nan=False), min_size=1, max_size=300),
       st.sampled_from([0.5, 0.95, 0.99]))
def test_percentiles_are_within_one_bin_of_the_truth(values: list[float], fraction: float) -> None:
    bins = Counter(bin_of(v) for v in values)
    ordered = sorted(values)
    truth = ordered[max(1, math.ceil(fraction * len(ordered))) - 1]  # the nearest-rank percentile
    estimate = percentile(bins, fraction)
    assert estimate is not None
    assert estimate >= min(truth, 0.001) * 0.999
    assert estimate <= max(truth, 0.001) * BIN_GROWTH * 1.0001


def test_memory_is_bounded_under_a_day_of_traffic() -> None:
    traffic = Traffic(T0)
    rng = random.Random(1)
    for second in range(0, 86_400, 7):
        traffic.request_done(f"s{rng.randrange(5)}:1", 200, Ending.DONE, rng.random(), rng.random(), 10, T0 + second)
        if second % 70 == 0:
            traffic.sample(1, 4, 0, T0 + second)
    for rings in [traffic.fleet, *traffic.servers.values()]:
        for name, ring in rings.items():
            seconds, width = RANGES[name]
            assert len(ring.buckets) <= seconds / width


def test_two_workers_increments_add_up_to_the_balancers_figures() -> None:
    """What each worker pushes to a shared store, summed, reads back as the figures of all their requests."""
    workers = [Traffic(T0), Traffic(T0)]
    alone = Traffic(T0)  # one worker that saw every request: the truth
    for worker in workers:
        worker.sharing = True
    for i in range(40):
        args = ("a:1" if i % 3 else "b:2", 200 if i % 7 else 504, Ending.DONE if i % 7 else Ending.TIMED_OUT,
                i / 100, 0.05 * (i % 5), 10, T0 + i)
        workers[i % 2].request_done(*args)
        alone.request_done(*args)
    sums: dict[tuple[str, int], Counter[str]] = {}
    for worker in workers:
        for key, fields in worker.take_increments().items():
            sums.setdefault(key, Counter()).update(fields)
    reader = Traffic(T0)
    reader.shared_reader = lambda name, indices: {i: dict(sums[(name, i)]) for i in indices if (name, i) in sums}
    for range_name in ("5m", "1h"):
        assert reader.summary(range_name, T0 + 45) == alone.summary(range_name, T0 + 45)
    assert [p["tokens_per_second"] for p in reader.series("5m", T0 + 45)] == \
           [p["tokens_per_second"] for p in alone.series("5m", T0 + 45)]
    assert workers[0].take_increments() == {}  # taken once
