"""A prompt as a chain of block hashes: what lets the balancer know where a prompt's prefix was sent before.

llama.cpp keeps each slot's last prompt in its KV cache (``cache_prompt``, on by default) and the
2026 builds keep more in host memory (``--cache-ram``): a request whose prompt begins like one a server
processed recently skips that part of the prefill. The balancer cannot see those caches; it remembers
what it sent where (paddler_sync/routing/affinity.py), as hashes of the prompt cut into fixed blocks,
each hash covering every block before it too: two prompts share their first k hashes exactly when they
share their first k blocks.

A chat is hashed in a canonical rendering (each message's role and text, in order), not in a
server's template: the next turn of a conversation (the history, the answer, a new question) begins
with the previous turn's rendering, which is all the match needs. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from typing import Any

BLOCK_BYTES = 256  # about 64 tokens of English: fine enough to matter, coarse enough to stay cheap
MAX_BLOCKS = 1024  # a quarter of a megabyte of prompt: beyond it, the head decides
BYTES_PER_TOKEN = 4  # to turn matched blocks into the tokens they likely hold


def prompt_text(body: dict[str, Any] | None) -> bytes:
    """The canonical bytes of a request's prompt (empty when it has none the balancer can read)."""
    if not body:
        return b""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = [_text(body.get("system"))]  # Anthropic's system prompt comes first
        for message in messages:
            if isinstance(message, dict):
                parts.append(f"\x1e{message.get('role', '')}\x1f{_text(message.get('content'))}")
        return "".join(parts).encode("utf-8", "replace")
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            return value.encode("utf-8", "replace")
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return b"\x00ids" + b",".join(str(v).encode() for v in value)
        if isinstance(value, list) and value:
            return "".join(f"\x1e{_text(item)}" for item in value).encode("utf-8", "replace")
    return b""


def _text(value: Any, depth: int = 0) -> str:
    if isinstance(value, str):
        return value
    if depth > 4:
        return ""
    if isinstance(value, list):
        return "".join(_text(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return _text(value.get("text") or value.get("content"), depth + 1)
    return ""


def block_hashes(text: bytes) -> tuple[str, ...]:
    """One hash per whole block, each over everything before its end (a trailing partial block is not hashed:
    it is what the next turn most likely changes)."""
    out: list[str] = []
    running = hashlib.blake2b(digest_size=8)
    for start in range(0, min(len(text), BLOCK_BYTES * MAX_BLOCKS) - BLOCK_BYTES + 1, BLOCK_BYTES):
        running.update(text[start:start + BLOCK_BYTES])
        out.append(running.copy().hexdigest())
    return tuple(out)


def request_hashes(body: dict[str, Any] | None) -> tuple[str, ...]:
    return block_hashes(prompt_text(body))


def tokens_in(blocks: int) -> int:
    """The tokens ``blocks`` matched blocks likely hold."""
    return blocks * BLOCK_BYTES // BYTES_PER_TOKEN
