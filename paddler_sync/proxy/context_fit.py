"""Context fit: where a request's prompt (and, under OpenAI's rule, its generation limit) fits.

``--context-check prompt`` (the default, llama.cpp's own rule) routes a request only to servers whose slots
hold its prompt; a prompt that fits no slot of its model goes to a server with the largest slots, whose
llama.cpp answers exactly as it would without the balancer (b4748 with context shift truncates the prompt
and answers 200; otherwise llama.cpp's own "exceeds the available context size" error). Generation limits
are llama.cpp's to enforce: it stops at the end of the context. ``prompt-and-limit`` (OpenAI's rule) answers
400 ``context_length_exceeded`` up front, with the numbers, when the prompt plus ``max_tokens`` / ``n_predict``
fits no slot of its model.

Sizes decide where they safely can (paddler_sync/proxy/ask.py); near the limit the prompt is counted
exactly by a server of the model, over the pooled connections and without a slot: a chat is rendered
with that server's template (``/apply-template``) and tokenized as llama.cpp will (``/tokenize`` with
its special tokens), a plain prompt is tokenized. Any other shape, or a count that fails, is left to
llama.cpp to judge.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import urllib3.exceptions

from paddler_sync.proxy.ask import Ask, Fit, judge
from paddler_sync.proxy.upstream import Transport

if TYPE_CHECKING:
    from paddler_sync.ledger.ledger import Ledger


class ContextTooLong(Exception):
    """The prompt (``counted`` exactly, or a lower bound from its size) plus the limit exceeds ``n_ctx``."""

    def __init__(self, prompt_tokens: int, limit: int | None, n_ctx: int, model: str | None, counted: bool) -> None:
        self.prompt_tokens, self.limit, self.n_ctx, self.counted = prompt_tokens, limit, n_ctx, counted
        how = "counted by llama.cpp's tokenizer" if counted else "at least, from its size"
        asked = f" plus max_tokens {limit}" if limit else ""
        where = f"model '{model}'" if model else "this fleet"
        super().__init__(f"the prompt ({prompt_tokens} tokens, {how}){asked} needs more context than any server "
                         f"of {where} holds: {n_ctx} tokens per slot. Shorten the prompt or lower max_tokens")

    def fields(self) -> dict[str, Any]:
        """The numbers, beside the message (llama.cpp's own overflow error carries them the same way)."""
        return {"n_prompt_tokens": self.prompt_tokens, "max_tokens": self.limit, "n_ctx": self.n_ctx,
                "counted": self.counted}


class ContextCheck:
    def __init__(self, ledger: Ledger, transport: Transport, mode: str = "prompt") -> None:
        self.ledger = ledger
        self.transport = transport
        self.mode = mode  # --context-check: prompt, prompt-and-limit or off

    def need(self, ask: Ask, model: str | None, headers: dict[str, str]) -> int | None:
        """The context the request needs (to route it only where it fits), None when unknown. A prompt that
        fits no slot needs the largest (llama.cpp there answers it as it would directly), except under
        prompt-and-limit, which raises ContextTooLong. ``headers``: the client's, for the count."""
        n_ctx = self.largest_context(model) if self.mode != "off" else None
        if n_ctx is None:
            return None
        refuse = self.mode == "prompt-and-limit"
        if not refuse:
            ask = replace(ask, limit=None)
        judgement = judge(ask, n_ctx)
        if judgement.fit is Fit.FITS:
            return judgement.need
        if judgement.fit is Fit.TOO_BIG:
            if refuse:
                raise ContextTooLong(judgement.prompt_tokens, ask.limit, n_ctx, ask.named, counted=False)
            return n_ctx
        counted = self.count(ask, model, headers)
        if counted is None:
            return None
        if counted + (ask.limit or 1) > n_ctx:
            if refuse:
                raise ContextTooLong(counted, ask.limit, n_ctx, ask.named, counted=True)
            return n_ctx
        return counted + (ask.limit or 1)

    def largest_context(self, model: str | None) -> int | None:
        """The most context a slot of the model holds; None when a server of it does not say (or none serves it)."""
        sizes = [u.serving.n_ctx for u in self.ledger.upstreams() if u.serving.serves(model)]
        if not sizes or None in sizes:
            return None
        return max(s for s in sizes if s is not None)

    def count(self, ask: Ask, model: str | None, headers: dict[str, str]) -> int | None:
        """The prompt's tokens as a server of the model counts them, or None when it cannot say."""
        body = ask.body or {}
        reservation = self.ledger.pick_without_slot(model)
        if reservation is None:
            return None
        named = {"model": ask.named} if ask.named else {}
        if isinstance(body.get("messages"), list):
            rendered = self._post(reservation.addr, "/apply-template", {"messages": body["messages"], **named},
                                  headers)
            prompt = rendered.get("prompt") if rendered else None
        else:
            prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        tokens = self._post(reservation.addr, "/tokenize", {"content": prompt, "add_special": True, **named}, headers)
        found = tokens.get("tokens") if tokens else None
        return len(found) + ask.prompt_ids if isinstance(found, list) else None

    def _post(self, addr: str, path: str, payload: dict[str, Any],
              client_headers: dict[str, str]) -> dict[str, Any] | None:
        data = json.dumps(payload).encode()
        headers = {"Host": addr, "Content-Type": "application/json", "Content-Length": str(len(data))}
        if "Authorization" in client_headers:
            headers["Authorization"] = client_headers["Authorization"]
        try:
            response = self.transport.send("POST", addr, path, headers, data, None)
            try:
                raw = response.read()
            finally:
                response.release_conn()
            parsed = json.loads(raw) if response.status == 200 else None
        except (urllib3.exceptions.HTTPError, OSError, ValueError):
            return None
        return parsed if isinstance(parsed, dict) else None
