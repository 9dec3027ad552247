"""How a finished or streaming generation is answered, per API: llama.cpp's native /completion, OpenAI
completions and chat, and (2026 builds) OpenAI Responses and Anthropic Messages.

Shapes, field order and SSE framing follow tests/captures/ (b4748) and tests/captures/2026/ (the
``modern`` dialect). A stream is ``stream_start()``, one ``stream_token()`` per token, ``stream_end()``; each gets the
``Outcome`` so far (tokens decoded, prompt tokens served from the cache).
"""

from __future__ import annotations

import random
import string
import time
from dataclasses import dataclass
from typing import Any

from paddler_sync.simulator import payloads
from paddler_sync.simulator.payloads import dumps


@dataclass
class Completion:
    """One generation request, after parsing: what to run and how to answer."""

    tokens: list[int]
    prompt_text: str
    n_predict: int
    stream: bool
    params: dict[str, Any]
    model: str
    truncated: bool = False
    include_usage: bool = False  # OpenAI stream_options.include_usage


@dataclass
class Outcome:
    """What a finished generation reports in its final event."""

    slot_id: int = -1
    n_prompt: int = 0
    n_cached: int = 0
    prompt_seconds: float = 0.0
    n_decoded: int = 0
    decode_seconds: float = 0.0
    content: str = ""

    def timings(self, modern: bool) -> dict[str, float]:
        timings = payloads.timings_json(self.n_prompt - self.n_cached, self.prompt_seconds, self.n_decoded,
                                        self.decode_seconds)
        return {"cache_n": self.n_cached, **timings} if modern else timings


def sse(event: dict[str, Any], stamp: bool, name: str | None = None) -> bytes:
    """One server-sent event; ``name`` gives it an ``event:`` line (Responses and Anthropic framing)."""
    if stamp:
        event["stamp_ns"] = time.monotonic_ns()
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + dumps(event) + b"\n\n"


def random_id(rng: random.Random, prefix: str) -> str:
    return prefix + "".join(rng.choices(string.ascii_letters + string.digits, k=32))


class NativeFormat:
    """/completion: partial events with id_slot -1; the last one carries everything; no [DONE]."""

    def __init__(self, job: Completion, modern: bool, stamp: bool) -> None:
        self.job = job
        self.modern = modern
        self.stamp = stamp

    def stream_start(self) -> list[bytes]:
        return []

    def stream_token(self, token: int, piece: str, o: Outcome) -> bytes:
        return sse({"index": 0, "content": piece, "tokens": [token], "stop": False, "id_slot": -1,
                    "tokens_predicted": o.n_decoded, "tokens_evaluated": len(self.job.tokens)}, self.stamp)

    def stream_end(self, o: Outcome) -> list[bytes]:
        return [sse(self.final(o, stream=True), self.stamp)]

    def final(self, o: Outcome, stream: bool = False) -> dict[str, Any]:
        return {
            "index": 0, "content": "" if stream else o.content, "tokens": [], "id_slot": o.slot_id, "stop": True,
            "model": self.job.model, "tokens_predicted": o.n_decoded, "tokens_evaluated": o.n_prompt,
            "generation_settings": self.job.params, "prompt": self.job.prompt_text, "has_new_line": False,
            "truncated": self.job.truncated, "stop_type": "limit", "stopping_word": "",
            "tokens_cached": max(0, o.n_prompt + o.n_decoded - 1), "timings": o.timings(self.modern),
        }


class OpenAIFormat:
    """/v1/completions and /v1/chat/completions: OpenAI chunks, then [DONE]. b4748 puts usage on every last
    chunk; 2026 builds open a chat stream with the assistant's role and give usage only when asked."""

    def __init__(self, job: Completion, modern: bool, stamp: bool, completion_id: str, fingerprint: str,
                 chat: bool) -> None:
        self.job = job
        self.modern = modern
        self.stamp = stamp
        self.chat = chat
        self.id = completion_id
        self.fingerprint = fingerprint
        self.created = int(time.time())

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {"choices": [choice], "created": self.created, "id": self.id, "model": self.job.model,
                "system_fingerprint": self.fingerprint, "object": "chat.completion.chunk"}

    def stream_start(self) -> list[bytes]:
        if self.chat and self.modern:
            return [sse(self._chunk({"finish_reason": None, "index": 0,
                                     "delta": {"role": "assistant", "content": None}}), self.stamp)]
        return []

    def stream_token(self, token: int, piece: str, o: Outcome) -> bytes:
        if self.chat:
            return sse(self._chunk({"finish_reason": None, "index": 0, "delta": {"content": piece}}), self.stamp)
        return sse({"choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}],
                    "created": self.created, "model": self.job.model, "system_fingerprint": self.fingerprint,
                    "object": "text_completion", "id": self.id}, self.stamp)

    def stream_end(self, o: Outcome) -> list[bytes]:
        return [sse(self.final(o, stream=True), self.stamp), b"data: [DONE]\n\n"]

    def usage(self, o: Outcome) -> dict[str, Any]:
        usage: dict[str, Any] = {"completion_tokens": o.n_decoded, "prompt_tokens": o.n_prompt,
                                 "total_tokens": o.n_prompt + o.n_decoded}
        if self.modern:
            usage["prompt_tokens_details"] = {"cached_tokens": o.n_cached}
        return usage

    def final(self, o: Outcome, stream: bool = False) -> dict[str, Any]:
        if self.chat and stream:
            body = self._chunk({"finish_reason": "length", "index": 0, "delta": {}})
            if not self.modern or self.job.include_usage:
                body["usage"] = self.usage(o)
            body["timings"] = o.timings(self.modern)
            return body
        if self.chat:
            choice = {"finish_reason": "length", "index": 0, "message": {"role": "assistant", "content": o.content}}
            kind = "chat.completion"
        else:
            choice = {"text": "" if stream else o.content, "index": 0, "logprobs": None, "finish_reason": "length"}
            kind = "text_completion"
        return {"choices": [choice], "created": self.created, "model": self.job.model,
                "system_fingerprint": self.fingerprint, "object": kind, "usage": self.usage(o), "id": self.id,
                "timings": o.timings(self.modern)}


class ResponsesFormat:
    """/v1/responses (2026 builds): OpenAI Responses, its stream as named events."""

    def __init__(self, job: Completion, stamp: bool, rng: random.Random) -> None:
        self.job = job
        self.stamp = stamp
        self.id = random_id(rng, "resp_")
        self.item_id = random_id(rng, "msg_")
        self.created = int(time.time())
        self.text: list[str] = []

    def _event(self, name: str, body: dict[str, Any]) -> bytes:
        return sse({"type": name, **body}, self.stamp, name)

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def _usage(self, o: Outcome) -> dict[str, Any]:
        return {"input_tokens": o.n_prompt, "output_tokens": o.n_decoded, "total_tokens": o.n_prompt + o.n_decoded,
                "input_tokens_details": {"cached_tokens": o.n_cached}}

    def stream_start(self) -> list[bytes]:
        response = {"id": self.id, "object": "response", "status": "in_progress"}
        return [self._event("response.created", {"response": response}),
                self._event("response.in_progress", {"response": response}),
                self._event("response.output_item.added", {"item": {
                    "content": [], "id": self.item_id, "role": "assistant", "status": "in_progress",
                    "type": "message"}}),
                self._event("response.content_part.added", {"item_id": self.item_id,
                                                            "part": {"type": "output_text", "text": ""}})]

    def stream_token(self, token: int, piece: str, o: Outcome) -> bytes:
        self.text.append(piece)
        return self._event("response.output_text.delta", {"item_id": self.item_id, "delta": piece})

    def stream_end(self, o: Outcome) -> list[bytes]:
        text = "".join(self.text)
        item = {"type": "message", "status": "completed", "id": self.item_id, "content": [self._part(text)],
                "role": "assistant"}
        response = {"id": self.id, "object": "response", "created_at": self.created, "status": "completed",
                    "model": self.job.model, "output": [item], "usage": self._usage(o)}
        return [self._event("response.output_text.done", {"item_id": self.item_id, "text": text}),
                self._event("response.content_part.done", {"item_id": self.item_id, "part": self._part(text)}),
                self._event("response.output_item.done", {"item": item}),
                self._event("response.completed", {"response": response, "timings": o.timings(True)})]

    def final(self, o: Outcome, stream: bool = False) -> dict[str, Any]:
        return {"completed_at": int(time.time()), "created_at": self.created, "id": self.id,
                "model": self.job.model, "object": "response",
                "output": [{"content": [self._part(o.content)], "id": self.item_id, "role": "assistant",
                            "status": "completed", "type": "message"}],
                "status": "completed", "usage": self._usage(o)}


class MessagesFormat:
    """/v1/messages (2026 builds): Anthropic Messages, its stream as named events."""

    def __init__(self, job: Completion, stamp: bool, rng: random.Random) -> None:
        self.job = job
        self.stamp = stamp
        self.id = random_id(rng, "chatcmpl-")

    def _event(self, name: str, body: dict[str, Any]) -> bytes:
        return sse({"type": name, **body}, self.stamp, name)

    def _usage(self, o: Outcome, output_tokens: int) -> dict[str, int]:
        return {"cache_read_input_tokens": o.n_cached, "input_tokens": o.n_prompt - o.n_cached,
                "output_tokens": output_tokens}

    def stream_start(self) -> list[bytes]:
        return []  # message_start carries the cache figures, known once the prompt ran: sent with the first token

    def stream_token(self, token: int, piece: str, o: Outcome) -> bytes:
        delta = self._event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
        return delta if o.n_decoded > 1 else self._opening(o) + delta

    def _opening(self, o: Outcome) -> bytes:
        message: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant", "content": [],
                                   "model": self.job.model, "stop_reason": None, "stop_sequence": None,
                                   "usage": self._usage(o, 0)}
        return (self._event("message_start", {"message": message})
                + self._event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))

    def stream_end(self, o: Outcome) -> list[bytes]:
        opening = [self._opening(o)] if o.n_decoded == 0 else []
        return [*opening, self._event("content_block_stop", {"index": 0}),
                self._event("message_delta", {"delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                              "usage": {"output_tokens": o.n_decoded}}),
                self._event("message_stop", {})]

    def final(self, o: Outcome, stream: bool = False) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "content": [{"type": "text", "text": o.content}],
                "model": self.job.model, "stop_reason": "max_tokens", "stop_sequence": None,
                "usage": self._usage(o, o.n_decoded)}


Format = NativeFormat | OpenAIFormat | ResponsesFormat | MessagesFormat
