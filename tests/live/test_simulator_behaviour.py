"""The simulator's slots behave: they queue when full, free on disconnect, cache prompts, load, speak dialects."""

from __future__ import annotations

import json
import socket
import threading
import time

import requests

from tests.helpers import Fleet, wait_until


def stats(url: str) -> dict:
    return requests.get(url + "/simulator/stats", timeout=5).json()


def metric(url: str, name: str) -> float:
    for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(f"llamacpp:{name} "):
            return float(line.split()[1])
    raise AssertionError(name)


def stream_in_background(url: str, n_predict: int, results: list) -> threading.Thread:
    def run() -> None:
        try:
            with requests.post(url + "/completion", json={"prompt": "busy stream", "n_predict": n_predict,
                                                          "stream": True}, stream=True, timeout=30) as response:
                results.append(sum(1 for line in response.iter_lines() if line.startswith(b"data: ")))
        except requests.RequestException:  # the simulator stopped first (end of a test)
            results.append(-1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_full_server_queues_the_next_request(fleet: Fleet) -> None:
    sim = fleet.simulator("--parallel", "2", "--decode-tokens-per-second", "50")
    results: list[int] = []
    threads = [stream_in_background(sim.url, 40, results) for _ in range(3)]
    wait_until(lambda: metric(sim.url, "requests_deferred") == 1, message="one deferred request")
    assert metric(sim.url, "requests_processing") == 2
    assert requests.get(sim.url + "/slots?fail_on_no_slot=1", timeout=5).status_code == 503
    assert requests.get(sim.url + "/health", timeout=5).status_code == 200  # health says nothing of slots
    for thread in threads:
        thread.join(10)
    assert results == [41, 41, 41]  # 40 tokens and the final event each: the queued one ran after a slot freed
    counters = stats(sim.url)
    assert counters["requests_deferred_total"] == 1 and counters["requests_total"] == 3


def test_queued_stream_gets_headers_at_once(fleet: Fleet) -> None:
    sim = fleet.simulator("--parallel", "1", "--decode-tokens-per-second", "20")
    busy: list[int] = []
    stream_in_background(sim.url, 30, busy)
    wait_until(lambda: metric(sim.url, "requests_processing") == 1)
    started = time.monotonic()
    response = requests.post(sim.url + "/completion", json={"prompt": "x", "n_predict": 1, "stream": True},
                             stream=True, timeout=10)
    assert response.status_code == 200 and time.monotonic() - started < 0.5  # headers before any slot is free
    assert response.headers["Content-Type"] == "text/event-stream"
    response.close()


def test_a_stream_client_that_disconnects_frees_its_slot_at_once(fleet: Fleet) -> None:
    sim = fleet.simulator("--parallel", "1", "--decode-tokens-per-second", "50")
    sock = socket.create_connection(("127.0.0.1", sim.port))
    body = json.dumps({"prompt": "x", "n_predict": 1000, "stream": True})
    sock.sendall(f"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    sock.recv(4096)
    wait_until(lambda: metric(sim.url, "requests_processing") == 1)
    closed = time.monotonic()
    sock.close()
    wait_until(lambda: metric(sim.url, "requests_processing") == 0, timeout=2, interval=0.01)
    assert time.monotonic() - closed < 0.5


def test_a_non_stream_client_that_leaves_is_noticed_within_about_a_second(fleet: Fleet) -> None:
    sim = fleet.simulator("--parallel", "1", "--decode-tokens-per-second", "20")
    sock = socket.create_connection(("127.0.0.1", sim.port))
    body = json.dumps({"prompt": "x", "n_predict": 1000})
    sock.sendall(f"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    wait_until(lambda: metric(sim.url, "requests_processing") == 1)
    sock.close()
    wait_until(lambda: metric(sim.url, "requests_processing") == 0, timeout=4)
    assert stats(sim.url)["requests_cancelled_total"] == 1


def test_prompt_cache_skips_the_shared_prefix(fleet: Fleet) -> None:
    sim = fleet.simulator("--parallel", "1", "--decode-tokens-per-second", "0")
    prompt = "The quick brown fox jumps over the lazy dog " * 10
    first = requests.post(sim.url + "/completion", json={"prompt": prompt, "n_predict": 2}, timeout=10).json()
    second = requests.post(sim.url + "/completion", json={"prompt": prompt + "again", "n_predict": 2},
                           timeout=10).json()
    assert first["timings"]["prompt_n"] == first["tokens_evaluated"]
    assert second["timings"]["prompt_n"] < 5 < second["tokens_evaluated"]


def test_prefill_and_decode_speed_are_what_was_asked(fleet: Fleet) -> None:
    sim = fleet.simulator("--parallel", "1", "--decode-tokens-per-second", "100", "--prefill-ms-per-token", "2",
                          "--no-prompt-cache")
    started = time.monotonic()
    body = requests.post(sim.url + "/completion", json={"prompt": "word " * 100, "n_predict": 50},
                         timeout=10).json()
    elapsed = time.monotonic() - started
    assert 0.15 < body["timings"]["prompt_ms"] / 1000 < 0.3  # ~101 tokens at 2 ms
    assert 0.45 < body["timings"]["predicted_ms"] / 1000 < 1.0  # 50 tokens at 100/s
    assert elapsed < 3


def test_loading_answers_503_then_ok(fleet: Fleet) -> None:
    sim = fleet.simulator("--startup-time", "1.5")
    response = requests.get(sim.url + "/health", timeout=5)
    assert response.status_code == 503
    assert response.json() == {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    assert requests.get(sim.url + "/slots", timeout=5).status_code == 503
    wait_until(lambda: requests.get(sim.url + "/health", timeout=5).status_code == 200, timeout=5)


def test_state_dialect_has_state_instead_of_is_processing(fleet: Fleet) -> None:
    sim = fleet.simulator("--dialect", "state", "--parallel", "2")
    slots = requests.get(sim.url + "/slots", timeout=5).json()
    assert [s["state"] for s in slots] == [0, 0]
    assert all("is_processing" not in s for s in slots)


def test_modern_dialect(fleet: Fleet) -> None:
    sim = fleet.simulator("--dialect", "modern", "--parallel", "2")
    slots = requests.get(sim.url + "/slots", timeout=5).json()
    assert all(set(s) == {"id", "n_ctx", "speculative", "is_processing"} for s in slots)  # never used: lean
    assert requests.get(sim.url + "/v1/health", timeout=5).status_code == 200
    props = requests.get(sim.url + "/props", timeout=5).json()
    assert props["endpoint_slots"] is True and "modalities" in props
