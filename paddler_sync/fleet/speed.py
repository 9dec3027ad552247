"""How fast each llama.cpp server generates, learned from the answers that pass through (no extra requests).

Used to foresee when a running request will end, so that a waiting one can be handed to that server a moment
before its slot frees (``--early-dispatch``). Per server, a smoothed time per generated token for one
request at the concurrency the server has been running: a request's whole time in llama.cpp (prompt included,
so the estimate errs late, never early) over the tokens it generated.
"""

from __future__ import annotations

import re

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
