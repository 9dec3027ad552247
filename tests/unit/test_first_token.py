"""Prompt-cache affinity and speed awareness, the pure parts: block hashes, the prefix index, llama.cpp's timings,
the first-token estimate, and the ledger weighing a free server against a full one that holds the prompt."""

from __future__ import annotations

from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.policy import FirstToken
from paddler_sync.ledger.slots import Upstream
from paddler_sync.routing.affinity import PrefixIndex
from paddler_sync.routing.first_token import CacheAwareness, FirstTokenEstimate
from paddler_sync.routing.prefixes import BLOCK_BYTES, block_hashes, prompt_text, request_hashes
from paddler_sync.routing.speed import ServerSpeeds, Timings, read_timings

SYSTEM = "You are a patient assistant who answers about rivers. " * 20


def conversation(turns: int) -> dict:
    messages = [{"role": "system", "content": SYSTEM}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: tell me about river number {turn}. " * 5})
        messages.append({"role": "assistant", "content": f"River {turn} is long and wide. " * 8})
    return {"messages": messages[:-1]}


def test_a_conversations_next_turn_extends_its_previous_turns_hashes() -> None:
    first, second = request_hashes(conversation(1)), request_hashes(conversation(2))
    assert len(first) >= 4 and second[:len(first)] == first
    other = request_hashes({"messages": [{"role": "system", "content": "Another prompt. " * 100}]})
    assert not set(other) & set(first)
    assert block_hashes(b"x" * (BLOCK_BYTES - 1)) == ()  # a partial block is not hashed
    assert request_hashes({"prompt": [1, 2, 3] * 200}) and prompt_text({"prompt": "héllo"}) == "héllo".encode()
    assert prompt_text(None) == b"" and prompt_text({"model": "x"}) == b""


def test_the_index_finds_the_longest_prefix_per_server_and_forgets_beyond_what_a_server_keeps() -> None:
    index = PrefixIndex()
    one, two = request_hashes(conversation(1)), request_hashes(conversation(2))
    index.learn("a", one, slots=1)
    assert index.matches(two) == {"a": len(one)}
    index.learn("b", two, slots=1)
    assert index.matches(two) == {"a": len(one), "b": len(two)}
    index.learn("a", request_hashes({"prompt": "unrelated " * 200}), slots=1)  # a's one slot now holds another
    assert index.matches(two) == {"b": len(two)}
    index.observe("b", expected_blocks=2, cached_blocks=10)  # it kept more than expected: a host-memory cache
    index.learn("b", request_hashes({"prompt": "other " * 200}), slots=1)
    assert index.matches(two)["b"] == len(two)  # kept: b is now believed to hold more than one prompt per slot
    index.forget("b")
    assert index.matches(two) == {}


def test_the_index_stays_within_its_bound() -> None:
    index = PrefixIndex(max_entries=50)
    for n in range(20):
        index.learn(f"s{n % 3}", request_hashes({"prompt": f"prompt {n} " * 300}), slots=100)
    assert len(index) <= 50


def test_timings_of_each_dialect() -> None:
    modern = b'"timings":{"cache_n":96,"prompt_n":4,"prompt_ms":2.5,"predicted_n":16,"predicted_ms":8.0}}'
    assert read_timings(modern) == Timings(4, 96, 2.5, 16, 8.0)
    native = b'"tokens_cached":100,"timings":{"prompt_n":4,"prompt_ms":2.0,"predicted_n":8,"predicted_ms":4.0}'
    assert read_timings(native) == Timings(4, 96, 2.0, 8, 4.0)
    chat = b'"usage":{"prompt_tokens":50},"timings":{"prompt_n":10,"prompt_ms":5.0,"predicted_n":2,"predicted_ms":1}'
    assert read_timings(chat) == Timings(10, 40, 5.0, 2, 1.0)
    assert read_timings(b'{"content":"no timings"}') is None


def test_speeds_are_smoothed_and_a_new_server_starts_from_the_median() -> None:
    speeds = ServerSpeeds()
    speeds.learn("a", Timings(100, 0, 100.0, 10, 100.0))  # 1000 prefill tokens/s, 100 decode tokens/s
    speeds.learn("b", Timings(100, 0, 500.0, 10, 1000.0))  # 200, 10
    speeds.learn("c", Timings(100, 0, 250.0, 10, 500.0))  # 400, 20
    assert round(speeds.prefill_rate("a")) == 1000 and round(speeds.decode_rate("b")) == 10
    assert round(speeds.prefill_rate("new")) == 400 and round(speeds.decode_rate("new")) == 20
    speeds.learn("a", Timings(100, 0, 200.0, 10, 100.0))
    assert 800 < speeds.prefill_rate("a") < 1000  # one slow answer moves it, a little


def upstream(key: str, total: int = 2, in_flight: int = 0) -> Upstream:
    return Upstream(key=key, addr=f"127.0.0.1:{9000 + ord(key[0])}", total=total, in_flight=in_flight, routable=True)


def test_the_first_token_rule_prefers_the_cache_then_speed_and_ties_go_to_the_plain_rule() -> None:
    speeds = ServerSpeeds()
    speeds.learn("fast", Timings(1000, 0, 1000.0, 10, 100.0))  # 1000 prefill tokens/s
    speeds.learn("slow", Timings(1000, 0, 4000.0, 10, 100.0))  # 250
    fast, slow = upstream("fast"), upstream("slow")
    cold = FirstTokenEstimate(2000, {}, None, speeds)
    assert FirstToken().choose([slow, fast], 0.0, cold) is fast
    warm = FirstTokenEstimate(2000, {"slow": 30}, None, speeds)  # slow holds 1,920 of its 2,000 tokens
    assert FirstToken().choose([slow, fast], 0.0, warm) is slow
    tiny = FirstTokenEstimate(2, {}, None, speeds)  # a few milliseconds either way: the most free slots decide
    roomy = upstream("roomy", total=4)
    assert FirstToken().choose([fast, roomy], 0.0, tiny) is roomy
    assert FirstToken().choose([upstream("fast", in_flight=2)], 0.0, cold) is None  # never a full one itself


def test_a_full_server_holding_the_prompt_is_worth_a_short_wait_and_never_a_long_one() -> None:
    speeds = ServerSpeeds()
    for key in ("a", "b"):
        speeds.learn(key, Timings(1000, 0, 2000.0, 10, 100.0))  # 500 prefill tokens/s: 4 s for 2,000 tokens
    clock = [100.0]
    ledger = Ledger(FirstToken(), clock=lambda: clock[0])
    ledger.report("a", "127.0.0.1:1", 1, 0, True)
    ledger.report("b", "127.0.0.1:2", 1, 0, True)
    running = ledger.reserve()
    assert running is not None and running.upstream.key == "a"
    ledger.expect_end(running, 101.0)  # a frees in 1 s
    holds = FirstTokenEstimate(2000, {"a": 31}, None, speeds)  # a holds 1,984 tokens: 4 s of prefill saved
    taken = ledger.reserve(score=holds)
    assert taken is not None and taken.upstream.key == "a" and taken.early  # waits inside llama.cpp, 1 s
    ledger.give_back(taken)
    ledger.expect_end(running, 110.0)  # now a frees only in 10 s: not worth it
    taken = ledger.reserve(score=holds)
    assert taken is not None and taken.upstream.key == "b"


def test_what_a_worker_learns_goes_to_its_outbox_for_the_others() -> None:
    awareness = CacheAwareness(1000)
    awareness.outbox = []
    estimate, hashes = awareness.estimate(conversation(1), 500, None)
    seen = awareness.sent(upstream("a"), hashes, estimate)
    assert awareness.outbox == [("a", hashes, 2)] and seen.expected_blocks == 0
    estimate, hashes = awareness.estimate(conversation(2), 900, None)
    assert estimate.cached_blocks == {"a": len(seen.hashes)}
    awareness.answered("a", awareness.sent(upstream("a"), hashes, estimate), Timings(100, 800, 50.0, 10, 20.0))
    assert round(awareness.speeds.prefill_rate("a")) == 2000
