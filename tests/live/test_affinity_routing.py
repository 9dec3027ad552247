"""Routing for the fastest first token through real processes: conversations come back to the server whose
prompt cache holds them, Retry-After follows how fast the queue drains, and a waiting stream may hear its
place in the queue. On both slot stores."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import Fleet, agents_ready, health, serve_simulator, wait_until

pytestmark = pytest.mark.both_stores


def converse(proxy: str, topic: int, turns: int) -> list[dict]:
    """One conversation: each turn re-sends the whole history with llama.cpp's own answers in it."""
    messages = [{"role": "system", "content": f"You are assistant number {topic}, expert on topic {topic}. " * 30}]
    answers = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Tell me more about part {turn} of topic {topic}, please."})
        answer = requests.post(proxy + "/v1/chat/completions", timeout=30,
                               json={"messages": messages, "max_tokens": 24}).json()
        answers.append(answer)
        messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
    return answers


def test_each_conversation_comes_back_to_the_server_that_holds_its_prompt(fleet: Fleet) -> None:
    balancer = fleet.balancer("--models-discovery-time", "0")
    for i in range(3):  # a slot more than the conversations need, so a report late under load leaves room
        serve_simulator(fleet, balancer, f"s{i}", "--parallel", "3", "--prefill-ms-per-token", "0.5",
              "--decode-tokens-per-second", "0")
    agents_ready(balancer, 3)
    with ThreadPoolExecutor(4) as pool:
        conversations = list(pool.map(lambda topic: converse(balancer.extra["proxy"], topic, 4), range(4)))
    later = [answer for answers in conversations for answer in answers[1:]]
    computed = sum(a["timings"]["prompt_n"] for a in later)
    prompt = sum(a["usage"]["prompt_tokens"] for a in later)
    assert computed / prompt < 0.3, f"later turns recomputed {computed} of {prompt} prompt tokens"
    lines = wait_until(lambda: (found := re.findall(r"end=done cached=(\d+)/(\d+)", balancer.log()))
                       and len(found) == 16 and found)  # each logged as its answer ends
    hits = [(int(hit), int(total)) for hit, total in lines]
    assert sum(hit for hit, _ in hits) > 0.7 * sum(total for _, total in hits[4:])
    metrics = requests.get(balancer.extra["management"] + "/metrics", timeout=5).text
    cached = sum(float(v) for v in re.findall(r"^paddler_agent_prompt_tokens_cached_total\{.*\} (\S+)$", metrics,
                                              re.M))
    assert cached >= sum(hit for hit, _ in hits) * 0.9  # another worker's last second may not be in yet
    figures = requests.get(balancer.extra["management"] + "/api/v1/traffic", timeout=5).json()
    assert figures["fleet"]["cache_hit_ratio"] > 0.5


def test_retry_after_follows_how_fast_the_queue_drains(fleet: Fleet) -> None:
    balancer = fleet.balancer("--models-discovery-time", "0", "--max-buffered-requests", "2",
                              "--buffered-request-timeout", "60")
    serve_simulator(fleet, balancer, "one", "--parallel", "1", "--decode-tokens-per-second", "40")
    agents_ready(balancer, 1)
    proxy = balancer.extra["proxy"]

    def complete() -> requests.Response:
        return requests.post(proxy + "/completion", json={"prompt": "x", "n_predict": 12}, timeout=60)

    with ThreadPoolExecutor(4) as pool:
        first = [pool.submit(complete) for _ in range(3)]  # one runs, two wait: the queue drains ~3 a second
        time.sleep(0.2)
        refused = complete()
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "60"  # nothing drained yet
        assert [f.result().status_code for f in first] == [200] * 3
        # the last answer reached its client a moment before its slot went back (it is released as the response
        # closes): the next three must find the slot free, as one runs and two wait
        wait_until(lambda: health(balancer)["requests_in_flight"] == 0)
        second = [pool.submit(complete) for _ in range(3)]
        time.sleep(0.2)
        refused = complete()
        assert [f.result().status_code for f in second] == [200] * 3
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 5


def test_a_waiting_stream_hears_its_place_in_the_queue_when_it_asks(fleet: Fleet) -> None:
    balancer = fleet.balancer("--models-discovery-time", "0", "--queue-updates", "--buffered-request-timeout", "30")
    serve_simulator(fleet, balancer, "one", "--parallel", "1", "--decode-tokens-per-second", "20")
    agents_ready(balancer, 1)
    proxy = balancer.extra["proxy"]
    body = {"prompt": "x", "n_predict": 30, "stream": True}
    busy = requests.post(proxy + "/completion", json=body, stream=True, timeout=30)
    lines: list[str] = []
    started = time.monotonic()
    waiting = requests.post(proxy + "/completion", json=body, stream=True, timeout=30,
                            headers={"X-Paddler-Queue-Updates": "1"})
    assert waiting.status_code == 200 and waiting.headers["Content-Type"] == "text/event-stream"
    consumer = threading.Thread(target=lambda: lines.extend(waiting.iter_lines(decode_unicode=True)))
    consumer.start()
    wait_until(lambda: any(line.startswith(": queue position=1 ") for line in lines), timeout=5)
    assert time.monotonic() - started < 1.2  # told at once, not after its wait
    assert busy.content  # the first stream ends; the second gets the slot
    consumer.join(30)
    events = [line for line in lines if line.startswith("data: ")]
    assert len(lines) > len(events) >= 15 and '"stop":true' in events[-1]
    plain = requests.post(proxy + "/completion", json=body, stream=True, timeout=30)
    assert not [line for line in plain.iter_lines(decode_unicode=True) if line.startswith(":")]


def test_a_waiting_stream_that_times_out_gets_an_error_line(fleet: Fleet) -> None:
    balancer = fleet.balancer("--models-discovery-time", "0", "--queue-updates", "--buffered-request-timeout", "1")
    serve_simulator(fleet, balancer, "one", "--parallel", "1", "--decode-tokens-per-second", "10")
    agents_ready(balancer, 1)
    proxy = balancer.extra["proxy"]
    busy = requests.post(proxy + "/completion", json={"prompt": "x", "n_predict": 40, "stream": True},
                         stream=True, timeout=30)
    waiting = requests.post(proxy + "/completion", json={"prompt": "x", "n_predict": 4, "stream": True}, timeout=30,
                            headers={"X-Paddler-Queue-Updates": "true"})
    lines = [line for line in waiting.text.splitlines() if line]
    assert lines[0].startswith(": queue position=1 ") and lines[-1].startswith("error: ")
    assert '"status": 504' in lines[-1] and "--buffered-request-timeout" in lines[-1]
    busy.close()
    assert re.search(r'"POST /completion" 504 upstream=- .* end=timed_out', balancer.log())
