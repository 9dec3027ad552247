"""How fast each llama.cpp server prefills and generates, learned from the answers that pass through (no extra
requests).

:class:`ServerSpeeds` keeps each server's prefill and decode speed from llama.cpp's own ``timings``: the
first-token routing (paddler_sync/routing/first_token.py) weighs them. :class:`DecodeSpeeds` is coarser on
purpose: it foresees when a running request will end, so that a waiting one can be handed to that server a
moment before its slot frees (``--early-dispatch``, and the first-token rule's weighing of a full server).
Per server, a smoothed time per generated token for one request at the concurrency the server has been
running: a request's whole time in llama.cpp (prompt included, so the estimate errs late, never early)
over the tokens it generated.
"""

from __future__ import annotations

import re
import statistics
from typing import NamedTuple

SMOOTHING = 0.2  # weight of the newest request in the running mean
# The tokens an answer generated: native /completion, OpenAI usage, Responses and Anthropic usage.
GENERATED = re.compile(rb'"(?:tokens_predicted|completion_tokens|output_tokens)":(\d+)')


def generated_tokens(final_chunk: bytes) -> int | None:
    """The token count an answer's last chunk reports (its final event, or the whole non-streamed body)."""
    found = GENERATED.findall(final_chunk[-4096:])
    return int(found[-1]) if found else None


class DecodeSpeeds:
    def __init__(self) -> None:
        self._seconds_per_token: dict[str, float] = {}

    def expected_seconds(self, addr: str, tokens: int) -> float | None:
        per_token = self._seconds_per_token.get(addr)
        return None if per_token is None else per_token * tokens

    def learn(self, addr: str, seconds: float, tokens: int) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        sample = seconds / tokens
        known = self._seconds_per_token.get(addr)
        self._seconds_per_token[addr] = sample if known is None else known + SMOOTHING * (sample - known)


TIMING = re.compile(rb'"(prompt_n|prompt_ms|predicted_n|predicted_ms|cache_n|tokens_cached|prompt_tokens)":'
                    rb'(\d+(?:\.\d+)?)')
DEFAULT_PREFILL_PER_SECOND = 500.0  # until any server has answered: a CPU-class guess, replaced at once
DEFAULT_DECODE_PER_SECOND = 30.0


class Timings(NamedTuple):
    """What llama.cpp's final event (or body) says about one request: its own counts and times."""

    prompt_processed: int  # prompt tokens it computed (timings.prompt_n)
    prompt_cached: int  # prompt tokens it reused from its cache
    prompt_ms: float
    predicted: int
    predicted_ms: float


def read_timings(final: bytes) -> Timings | None:
    """The timings of an answer's last chunk(s): 2026 builds say ``cache_n``; b4748 ``tokens_cached`` on /completion,
    and on the OpenAI paths only ``usage.prompt_tokens`` beside ``prompt_n``."""
    found: dict[bytes, float] = {}
    for name, value in TIMING.findall(final[-8192:]):
        found[name] = float(value)  # the last of each: the final event's
    if b"prompt_n" not in found or b"prompt_ms" not in found:
        return None
    processed = int(found[b"prompt_n"])
    if b"cache_n" in found:
        cached = int(found[b"cache_n"])
    elif b"tokens_cached" in found:
        cached = max(0, int(found[b"tokens_cached"]) - processed)
    else:
        cached = max(0, int(found.get(b"prompt_tokens", processed)) - processed)
    return Timings(processed, cached, found[b"prompt_ms"], int(found.get(b"predicted_n", 0)),
                   found.get(b"predicted_ms", 0.0))


class ServerSpeeds:
    """Each server's prefill and decode speed (tokens/s), from the timings of the answers that pass through,
    smoothed; a server not measured yet is assumed to run at the fleet's median."""

    def __init__(self) -> None:
        self._prefill: dict[str, float] = {}
        self._decode: dict[str, float] = {}

    def learn(self, key: str, timings: Timings) -> None:
        if timings.prompt_processed >= 8 and timings.prompt_ms > 0:  # a few tokens say more about overhead
            _smooth(self._prefill, key, timings.prompt_processed * 1000 / timings.prompt_ms)
        if timings.predicted >= 4 and timings.predicted_ms > 0:
            _smooth(self._decode, key, timings.predicted * 1000 / timings.predicted_ms)

    def prefill_rate(self, key: str) -> float:
        return self._prefill.get(key) or _median(self._prefill, DEFAULT_PREFILL_PER_SECOND)

    def decode_rate(self, key: str) -> float:
        return self._decode.get(key) or _median(self._decode, DEFAULT_DECODE_PER_SECOND)


def _smooth(rates: dict[str, float], key: str, sample: float) -> None:
    known = rates.get(key)
    rates[key] = sample if known is None else known + SMOOTHING * (sample - known)


def _median(rates: dict[str, float], default: float) -> float:
    return statistics.median(rates.values()) if rates else default
