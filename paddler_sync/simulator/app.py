"""The simulated llama.cpp server's HTTP side: routes, headers, status codes and SSE framing.

Everything a client sees follows the captures of a real b4748 server (tests/captures/): the
common headers, ``{"error": {...}}`` bodies, loading and API-key rules, and streams whose headers
go out at once, even when the request then waits for a slot (as llama.cpp's deferred tasks do).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent

from paddler_sync.simulator import payloads
from paddler_sync.simulator.engine import Engine, Slot
from paddler_sync.simulator.formats import (
    Completion,
    Format,
    MessagesFormat,
    NativeFormat,
    OpenAIFormat,
    Outcome,
    ResponsesFormat,
    random_id,
)
from paddler_sync.simulator.http import (
    JSON,
    STATUS,
    HttpError,
    Request,
    StartResponse,
    closing,
    common_headers,
)
from paddler_sync.simulator.payloads import dumps, error_body
from paddler_sync.simulator.prompts import anthropic_messages, chatml, messages_of, responses_input, truncate_prompt
from paddler_sync.simulator.tokens import BOS_PIECE, TextGenerator, detokenize, split_pieces, tokenize

PUBLIC_PATHS = frozenset({"/health", "/models", "/v1/models", "/"})
CLIENT_CHECK_INTERVAL = 1.0  # llama.cpp notices a vanished non-stream client on a 1 s wait timeout
N_EMBD = 128


@dataclass
class SimulatorConfig:
    model: str = "models/simulated.gguf"
    aliases: tuple[str, ...] = ()  # the 2026 build lists them in /v1/models (the id among them)
    tags: tuple[str, ...] = ()  # --tags, listed beside them
    n_ctx: int = 4096
    slots_endpoint: bool = True
    metrics_endpoint: bool = True
    embeddings: bool = False
    api_key: str | None = None
    dialect: str = "b4748"
    startup_time: float = 0.0
    default_n_predict: int = 64
    build_info: str = "b4748-c392e509"
    seed: int = 42
    stamp_events: bool = False


class SimulatorApp:
    def __init__(self, engine: Engine, config: SimulatorConfig) -> None:
        self.engine = engine
        self.config = config
        self.started = time.time()
        self.ready_at = time.monotonic() + config.startup_time
        self._ids = random.Random(config.seed)
        self.routes: dict[tuple[str, str], Callable[..., Any]] = {
            ("GET", "/health"): self.health,
            ("GET", "/slots"): self.slots,
            ("GET", "/props"): self.props,
            ("POST", "/props"): self.props_post,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/models"): self.models,
            ("GET", "/v1/models"): self.models,
            ("GET", "/"): self.index,
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/detokenize"): self.detokenize,
            ("POST", "/apply-template"): self.apply_template,
            ("POST", "/completion"): self.completion,
            ("POST", "/completions"): self.completion,
            ("POST", "/v1/completions"): self.oai_completion,
            ("POST", "/chat/completions"): self.chat_completion,
            ("POST", "/v1/chat/completions"): self.chat_completion,
            ("POST", "/embedding"): self.embedding,
            ("POST", "/embeddings"): self.embedding,
            ("POST", "/v1/embeddings"): self.oai_embeddings,
            ("POST", "/infill"): self.infill,
            ("POST", "/rerank"): self.rerank,
            ("POST", "/reranking"): self.rerank,
            ("POST", "/v1/rerank"): self.rerank,
            ("POST", "/v1/reranking"): self.rerank,
            ("GET", "/simulator/stats"): self.simulator_stats,
        }
        if self.modern:
            self.routes.update({
                ("GET", "/v1/health"): self.health,
                ("POST", "/responses"): self.responses,
                ("POST", "/v1/responses"): self.responses,
                ("POST", "/v1/messages"): self.messages,
                ("POST", "/v1/messages/count_tokens"): self.count_tokens,
                ("POST", "/v1/chat/completions/input_tokens"): self.input_tokens,
                ("POST", "/chat/completions/input_tokens"): self.input_tokens,
                ("POST", "/v1/responses/input_tokens"): self.input_tokens,
                ("POST", "/responses/input_tokens"): self.input_tokens,
            })

    @property
    def modern(self) -> bool:
        """The 2026 builds (tests/captures/2026): leaner /slots, new endpoints, errors that close the connection."""
        return self.config.dialect == "modern"

    # --- WSGI --------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Any:
        origin = environ.get("HTTP_ORIGIN", "")
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        if environ.get("HTTP_CONNECTION", "").lower() == "close":
            start_response = closing(start_response)
        if method == "OPTIONS":
            return self._preflight(origin, start_response)
        try:
            if time.monotonic() < self.ready_at:
                return self._loading(path, origin, start_response)
            if self.config.api_key and path not in PUBLIC_PATHS and not self._authorized(environ):
                raise HttpError(401, "Invalid API Key")
            handler = self.routes.get((method, path))
            if handler is None:
                raise HttpError(404, "File Not Found")
            return handler(Request(environ, origin, start_response))
        except HttpError as exc:
            if self.modern:  # 2026 builds close the connection after an error
                start_response = closing(start_response)
            body = error_body(exc.code, exc.message, self.modern and exc.code in (401, 404))
            return self._send_json(start_response, origin, exc.code, body)

    def _authorized(self, environ: dict[str, Any]) -> bool:
        return environ.get("HTTP_AUTHORIZATION", "") == f"Bearer {self.config.api_key}"

    def _preflight(self, origin: str, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [
            ("Keep-Alive", "timeout=5, max=100"), ("Content-Length", "0"), ("Content-Type", "text/html"),
            ("Server", "llama.cpp"), ("Access-Control-Allow-Origin", origin),
            ("Access-Control-Allow-Credentials", "true"), ("Access-Control-Allow-Headers", "*"),
            ("Access-Control-Allow-Methods", "GET, POST"),
        ])
        return [b""]

    def _loading(self, path: str, origin: str, start_response: StartResponse) -> list[bytes]:
        if path == "/" or path.endswith(".html"):
            page = (b'<html><head><meta http-equiv="refresh" content="5"></head>'
                    b"<body><div id=\"loading\">The model is loading. Please wait.<br/>"
                    b"The user interface will appear soon.</div></body></html>")
            start_response("503 Service Unavailable", common_headers(origin, "text/html", len(page)))
            return [page]
        return self._send_json(start_response, origin, 503, error_body(503, "Loading model"))

    @staticmethod
    def _send_json(start_response: StartResponse, origin: str, code: int, body: Any) -> list[bytes]:
        data = dumps(body)
        start_response(STATUS[code], common_headers(origin, JSON, len(data)))
        return [data]

    # --- simple endpoints ----------------------------------------------------------------------------

    def health(self, req: Request) -> list[bytes]:
        return req.json({"status": "ok"})

    def slots(self, req: Request) -> list[bytes]:
        if not self.config.slots_endpoint:
            raise HttpError(501, "This server does not support slots endpoint. Start it with `--slots`")
        fail_on_no_slot = req.query.get("fail_on_no_slot", "") not in ("", "0", "false")
        if fail_on_no_slot and all(s.is_processing for s in self.engine.slots):
            raise HttpError(503, "no slot available")
        return req.json([payloads.slot_json(s, self.config.dialect) for s in self.engine.slots])

    def props(self, req: Request) -> list[bytes]:
        endpoints = {"slots": self.config.slots_endpoint, "props": False, "metrics": self.config.metrics_endpoint}
        return req.json(payloads.props_json(self.engine.slots[0], len(self.engine.slots), self.config.model,
                                            self.config.build_info, self.config.dialect, endpoints))

    def props_post(self, req: Request) -> list[bytes]:
        raise HttpError(501, "This server does not support changing global properties. Start it with `--props`")

    def metrics(self, req: Request) -> list[bytes]:
        if not self.config.metrics_endpoint:
            raise HttpError(501, "This server does not support metrics endpoint. Start it with `--metrics`")
        e = self.engine
        kv_tokens = sum(len(s.cache) for s in e.slots)
        body = payloads.metrics_text(e.counters, e.processing, e.deferred, kv_tokens, self.config.n_ctx,
                                     self.config.dialect)
        req.start_response("200 OK", [
            ("Keep-Alive", "timeout=5, max=100"), ("Access-Control-Allow-Origin", req.origin),
            ("Process-Start-Time-Unix", str(int(self.started))), ("Server", "llama.cpp"),
            ("Content-Length", str(len(body))), ("Content-Type", "text/plain; version=0.0.4"),
        ])
        return [body]

    def models(self, req: Request) -> list[bytes]:
        return req.json(payloads.models_json(self.config.model, int(self.started), self.config.n_ctx,
                                             self.engine.slots[0].n_ctx, self.config.dialect, self.config.aliases,
                                             self.config.tags))

    def index(self, req: Request) -> list[bytes]:
        page = b"<!doctype html><title>llama.cpp - simulated</title><p>paddler_sync llama.cpp simulator</p>"
        req.start_response("200 OK", common_headers(req.origin, "text/html; charset=utf-8", len(page)))
        return [page]

    def tokenize(self, req: Request) -> list[bytes]:
        body = req.body_json()
        content = body.get("content", "")
        if not isinstance(content, str):
            raise HttpError(400, "\"content\" must be a string")
        add_special = bool(body.get("add_special", False))
        tokens = tokenize(content, add_bos=add_special)
        if body.get("with_pieces"):
            pieces = split_pieces(content)
            offset = len(tokens) - len(pieces)
            return req.json({"tokens": [{"id": t, "piece": BOS_PIECE if i < offset else pieces[i - offset]}
                                        for i, t in enumerate(tokens)]})
        return req.json({"tokens": tokens})

    def detokenize(self, req: Request) -> list[bytes]:
        tokens = req.body_json().get("tokens", [])
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise HttpError(400, "\"tokens\" must be a list of token ids")
        return req.json({"content": detokenize(tokens)})

    def apply_template(self, req: Request) -> list[bytes]:
        return req.json({"prompt": chatml(messages_of(req.body_json()))})

    def infill(self, req: Request) -> list[bytes]:
        raise HttpError(501, "Infill is not supported by this model: prefix token is missing")

    def rerank(self, req: Request) -> list[bytes]:
        raise HttpError(501, "This server does not support reranking. Start it with `--reranking` and "
                             "without `--embedding`")

    def simulator_stats(self, req: Request) -> list[bytes]:
        """Not in llama.cpp: the counters tests and benchmarks read (how many requests had to wait)."""
        stats = dict(vars(self.engine.counters))
        stats.update(requests_processing=self.engine.processing, requests_deferred=self.engine.deferred,
                     total_slots=len(self.engine.slots))
        return req.json(stats)

    # --- generation ----------------------------------------------------------------------------------

    def completion(self, req: Request) -> Any:
        self._refuse_on_embeddings_server()
        body = req.body_json()
        job = self._parse_completion(body, prompt=body.get("prompt", ""), n_predict_keys=("n_predict",),
                                     model=body.get("model", "gpt-3.5-turbo"))
        return self._respond(req, job, NativeFormat(job, self.modern, self.config.stamp_events))

    def oai_completion(self, req: Request) -> Any:
        self._refuse_on_embeddings_server()
        body = req.body_json()
        job = self._parse_completion(body, prompt=body.get("prompt", ""),
                                     n_predict_keys=("max_tokens", "n_predict"),
                                     model=body.get("model", "gpt-3.5-turbo"))
        return self._respond(req, job, self._openai(job, chat=False))

    def chat_completion(self, req: Request) -> Any:
        self._refuse_on_embeddings_server()
        body = req.body_json()
        prompt = chatml(messages_of(body), add_generation_prompt=True)
        job = self._parse_completion(body, prompt=prompt, n_predict_keys=("max_tokens", "n_predict"),
                                     model=body.get("model", "gpt-3.5-turbo"))
        return self._respond(req, job, self._openai(job, chat=True))

    def _openai(self, job: Completion, chat: bool) -> OpenAIFormat:
        return OpenAIFormat(job, self.modern, self.config.stamp_events, self._completion_id(),
                            self.config.build_info, chat)

    def responses(self, req: Request) -> Any:
        """OpenAI Responses (2026 builds): ``input`` is text or a list of messages."""
        self._refuse_on_embeddings_server()
        body = req.body_json()
        job = self._parse_completion(body, prompt=chatml(responses_input(body)),
                                     n_predict_keys=("max_output_tokens",), model=body.get("model", self.config.model))
        return self._respond(req, job, ResponsesFormat(job, self.config.stamp_events, self._ids))

    def messages(self, req: Request) -> Any:
        """Anthropic Messages (2026 builds)."""
        self._refuse_on_embeddings_server()
        body = req.body_json()
        job = self._parse_completion(body, prompt=chatml(anthropic_messages(body)), n_predict_keys=("max_tokens",),
                                     model=body.get("model", self.config.model))
        return self._respond(req, job, MessagesFormat(job, self.config.stamp_events, self._ids))

    def count_tokens(self, req: Request) -> list[bytes]:
        """Answered by the HTTP thread, no slot: the chat prompt's length."""
        return req.json({"input_tokens": len(tokenize(chatml(anthropic_messages(req.body_json())), add_bos=True))})

    def input_tokens(self, req: Request) -> list[bytes]:
        body = req.body_json()
        messages = messages_of(body) if "messages" in body else responses_input(body)
        return req.json({"input_tokens": len(tokenize(chatml(messages), add_bos=True)),
                         "object": "response.input_tokens"})

    def _refuse_on_embeddings_server(self) -> None:
        if self.config.embeddings:
            raise HttpError(501, "This server does not support completions. Start it without `--embeddings`")

    def _completion_id(self) -> str:
        return random_id(self._ids, "chatcmpl-")

    def _parse_completion(self, body: dict[str, Any], prompt: Any, n_predict_keys: tuple[str, ...],
                          model: str) -> Completion:
        if isinstance(prompt, str):
            tokens = tokenize(prompt, add_bos=True)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            tokens = [1, *prompt]
        else:
            raise HttpError(400, "\"prompt\" must be a string or a list of tokens")
        n_predict = next((body[k] for k in n_predict_keys if k in body), -1)
        if not isinstance(n_predict, int) or isinstance(n_predict, bool):
            raise HttpError(400, f"\"{n_predict_keys[0]}\" must be an integer")
        if n_predict < 0:
            n_predict = self.config.default_n_predict
        n_ctx = self.engine.slots[0].n_ctx
        tokens, truncated = truncate_prompt(tokens, n_ctx)
        n_predict = max(0, min(n_predict, n_ctx - len(tokens)))
        stream = bool(body.get("stream", False))
        stop = body.get("stop") if isinstance(body.get("stop"), list) else []
        options = body.get("stream_options")
        return Completion(tokens=tokens, prompt_text=detokenize(tokens), n_predict=n_predict, stream=stream,
                          params=payloads.request_params(n_predict, stream, stop, self.config.dialect),
                          model=str(model), truncated=truncated,
                          include_usage=isinstance(options, dict) and bool(options.get("include_usage")))

    def _respond(self, req: Request, job: Completion, fmt: Format) -> Any:
        if job.stream:
            headers = [("Keep-Alive", "timeout=5, max=100"), ("Content-Type", "text/event-stream"),
                       ("Server", "llama.cpp"), ("Access-Control-Allow-Origin", req.origin)]
            if self.modern:
                headers.append(("X-Accel-Buffering", "no"))
            write = req.start_response("200 OK", headers)
            write(b"")  # headers leave now, as llama.cpp's do, even if the task then waits for a slot
            return self._stream(job, fmt)
        outcome = Outcome()
        pieces: list[str] = []
        for _token, piece in self._generate(job, outcome, client_gone=req.client_gone):
            pieces.append(piece)
        outcome.content = "".join(pieces)
        return req.json(fmt.final(outcome))

    def _stream(self, job: Completion, fmt: Format) -> Iterator[bytes]:
        outcome = Outcome()
        yield from fmt.stream_start()
        for token, piece in self._generate(job, outcome):
            yield fmt.stream_token(token, piece, outcome)
        yield from fmt.stream_end(outcome)

    def _generate(self, job: Completion, outcome: Outcome,
                  client_gone: Callable[[], bool] | None = None) -> Iterator[tuple[int, str]]:
        """Run one task in a slot; the ``finally`` gives the slot back however the request ends."""
        engine = self.engine
        slot = engine.acquire(job.tokens)
        decode_started = time.monotonic()
        try:
            n_cached = engine.cached_prefix(slot, job.tokens)
            start_task(slot, engine.next_task_id(), job)
            outcome.slot_id, outcome.n_prompt, outcome.n_cached = slot.id, len(job.tokens), n_cached
            outcome.prompt_seconds = engine.prefill(len(job.tokens) - n_cached, n_cached)
            slot.cache = list(job.tokens)
            generator = TextGenerator(self.config.seed, slot.id_task)
            decode_started = time.monotonic()
            due, last_check = decode_started, decode_started
            for _ in range(job.n_predict):
                due += engine.token_delay()
                pause = due - time.monotonic()
                gevent.sleep(pause if pause > 0 else 0)
                if client_gone and due - last_check >= CLIENT_CHECK_INTERVAL:
                    last_check = due
                    if client_gone():
                        engine.counters.requests_cancelled_total += 1
                        return
                token, piece = generator.next_piece()
                slot.cache.append(token)
                slot.n_decoded += 1
                slot.n_remain -= 1
                outcome.n_decoded = slot.n_decoded
                yield token, piece
            slot.has_next_token = False
            slot.n_remain = 0
        finally:
            outcome.decode_seconds = time.monotonic() - decode_started
            engine.count_decoded(outcome.n_decoded, outcome.decode_seconds)
            engine.release(slot)

    # --- embeddings ----------------------------------------------------------------------------------

    def embedding(self, req: Request) -> list[bytes]:
        content = req.body_json().get("content", "")
        tokens = tokenize(str(content), add_bos=True)
        vectors = self._embed(tokens)
        if self.config.embeddings:
            return req.json([{"index": 0, "embedding": [mean(vectors)]}])
        return req.json([{"index": 0, "embedding": vectors}])

    def oai_embeddings(self, req: Request) -> list[bytes]:
        if not self.config.embeddings:
            raise HttpError(400, "Pooling type 'none' is not OAI compatible. Please use a different pooling type")
        body = req.body_json()
        inputs = body.get("input", "")
        texts = inputs if isinstance(inputs, list) else [inputs]
        data, n_tokens = [], 0
        for index, text in enumerate(texts):
            tokens = tokenize(str(text), add_bos=True)
            n_tokens += len(tokens)
            data.append({"embedding": mean(self._embed(tokens)), "index": index, "object": "embedding"})
        return req.json({"model": body.get("model", self.config.model), "object": "list",
                         "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}, "data": data})

    def _embed(self, tokens: list[int]) -> list[list[float]]:
        """Embedding is a task too: it holds a slot for its prompt pass."""
        slot = self.engine.acquire(tokens)
        try:
            self.engine.prefill(len(tokens), 0)
        finally:
            self.engine.release(slot)
        return [[random.Random(t * 7919 + i).gauss(0, 1) for i in range(N_EMBD)] for t in tokens]


def start_task(slot: Slot, task_id: int, job: Completion) -> None:
    slot.id_task = task_id
    slot.prompt = job.prompt_text
    slot.params = job.params
    slot.n_decoded = 0
    slot.n_remain = job.n_predict
    slot.has_next_token = True


def mean(vectors: list[list[float]]) -> list[float]:
    if not vectors:
        return [0.0] * N_EMBD
    return [sum(column) / len(vectors) for column in zip(*vectors, strict=True)]
