"""What a request asks of the fleet, read once from its JSON body (or its query): the model it names,
how many tokens it may generate, and how big its prompt is, for the context check.

The context check (:func:`judge`) decides from sizes alone where it safely can, and asks for an exact
count otherwise:

- it surely **fits** when every byte of the prompt, plus room for the chat template, were a token of
  its own and it would still fit (no token is shorter than a byte), or when a generous estimate (4
  bytes a token) needs at most half the context (then a wrong guess costs llama.cpp's own error);
- it surely **does not fit** when even 32 bytes a token (longer than any token of a llama.cpp vocabulary's
  ordinary text) would overflow;
- in between it must be **counted** with the server's own tokenizer (paddler_sync/proxy/context_fit.py).

Pure: no I/O.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from paddler_sync.protocol.models import normalize

LIMIT_KEYS = ("n_predict", "max_tokens", "max_completion_tokens", "max_output_tokens")
PROMPT_KEYS = ("prompt", "input", "system", "input_prefix", "input_suffix", "input_extra", "query", "documents")
TEMPLATE_TOKENS = 16  # BOS and the template's own text, per request
TOKENS_PER_MESSAGE = 16  # role markers and separators a chat template adds around each message
ESTIMATE_BYTES_PER_TOKEN = 4
MOST_BYTES_PER_TOKEN = 32


class BadAsk(ValueError):
    """The body names its model wrongly (not a string): 400."""


@dataclass(frozen=True)
class Ask:
    named: str | None = None  # the model as the client wrote it
    limit: int | None = None  # tokens it may generate, when it says
    prompt_bytes: int = 0  # UTF-8 bytes of the text that becomes the prompt
    prompt_ids: int = 0  # prompt tokens given as token ids (counted exactly)
    messages: int = 0  # chat messages (each wrapped by the template)
    body: dict[str, Any] | None = None  # the parsed body, for an exact count

    @property
    def model(self) -> str | None:
        """The model, normalized for matching (paddler_sync/protocol/models.py)."""
        return normalize(self.named) if self.named is not None else None


def read_ask(method: str, query: str, body: bytes) -> Ask:
    """A GET's ``?model=``; a POST's JSON body (anything else asks for no model: llama.cpp answers it)."""
    if method != "POST":
        named = parse_qs(query).get("model") if "model=" in query else None
        return Ask(named=named[0]) if named and named[0].strip() else Ask()
    parsed = _json_object(body)
    if parsed is None:
        return Ask()
    named = parsed.get("model")
    if named is not None and not isinstance(named, str):
        raise BadAsk("'model' must be a string naming one of the fleet's models (GET /v1/models lists them)")
    size = _Size()
    for key in PROMPT_KEYS:
        size.add(parsed.get(key))
    messages = parsed.get("messages")
    if isinstance(messages, list):
        for message in messages:
            size.add(message.get("content") if isinstance(message, dict) else message)
    return Ask(named if named and named.strip() else None, _limit(parsed), size.bytes, size.ids,
               len(messages) if isinstance(messages, list) else 0, parsed)


def json_mistake(body: bytes, content_type: str) -> str | None:
    """Why a slot-taking request's body is not the JSON llama.cpp needs (llama.cpp would answer 500 for the
    client's mistake), naming where it broke; None when it parses, or is multipart (audio transcription).
    The Content-Type is not asked otherwise: llama.cpp reads JSON whatever it says (curl -d sends a form type)."""
    if content_type.lower().startswith("multipart/"):
        return None
    if not body.strip():
        return "the request body is empty: send a JSON object (Content-Type: application/json)"
    try:
        json.loads(body)
    except UnicodeDecodeError as exc:
        return f"the request body is not UTF-8 text: byte {exc.start} cannot be read ({exc.reason})"
    except json.JSONDecodeError as exc:
        return (f"the request body is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} "
                f"(byte {exc.pos} of {len(body)})")
    except (ValueError, RecursionError) as exc:
        return f"the request body is not valid JSON: {exc}"
    return None


def _json_object(body: bytes) -> dict[str, Any] | None:
    if body.lstrip()[:1] != b"{":
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _limit(parsed: dict[str, Any]) -> int | None:
    for key in LIMIT_KEYS:
        value = parsed.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class _Size:
    """Bytes of text and counts of token ids in a prompt of any shape (strings, ids, parts, lists of them)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.ids = 0

    def add(self, value: Any, depth: int = 0) -> None:
        if depth > 8 or value is None or isinstance(value, bool):
            return
        if isinstance(value, str):
            self.bytes += len(value.encode("utf-8", "replace"))
        elif isinstance(value, int):
            self.ids += 1
        elif isinstance(value, list):
            for item in value:
                self.add(item, depth + 1)
        elif isinstance(value, dict):  # a content part: {"type": "text", "text": ...}
            self.add(value.get("text") or value.get("content"), depth + 1)


def prompt_tokens(ask: Ask) -> int:
    """A cheap estimate of the prompt's tokens (4 bytes a token, the template's tokens per message)."""
    return ask.prompt_bytes // ESTIMATE_BYTES_PER_TOKEN + ask.prompt_ids + TOKENS_PER_MESSAGE * ask.messages


class Fit(enum.Enum):
    FITS = "fits"
    TOO_BIG = "too_big"
    COUNT = "count"  # too close to tell from sizes: count with the server's tokenizer


@dataclass(frozen=True)
class Judgement:
    fit: Fit
    prompt_tokens: int  # what the judgement assumed: an upper bound (fits), a lower bound (too big)
    need: int | None  # context to require of a server, when known for sure (an upper bound)


def judge(ask: Ask, n_ctx: int) -> Judgement:
    """Whether the prompt plus the generation limit fits ``n_ctx`` tokens, from sizes alone where safe."""
    limit = ask.limit or 1
    upper = ask.prompt_bytes + ask.prompt_ids + TEMPLATE_TOKENS + TOKENS_PER_MESSAGE * ask.messages
    if upper + limit <= n_ctx:
        return Judgement(Fit.FITS, upper, upper + limit)
    estimate = ask.prompt_bytes // ESTIMATE_BYTES_PER_TOKEN + ask.prompt_ids
    if estimate + limit <= n_ctx // 2:
        return Judgement(Fit.FITS, estimate, None)
    lower = ask.prompt_bytes // MOST_BYTES_PER_TOKEN + ask.prompt_ids
    if lower + limit > n_ctx:
        return Judgement(Fit.TOO_BIG, lower, None)
    return Judgement(Fit.COUNT, estimate, None)
