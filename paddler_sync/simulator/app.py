"""The simulated llama.cpp server's HTTP side: routes, headers, status codes and SSE framing.

Everything a client sees follows the b4748 captures in shared/reference/llamacpp/captures: the
common headers, ``{"error": {...}}`` bodies, loading and API-key rules, and streams whose headers
go out at once, even when the request then waits for a slot (as llama.cpp's deferred tasks do).
"""

from __future__ import annotations

import json
import random
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent

from paddler_sync.simulator import payloads
from paddler_sync.simulator.engine import Engine, Slot
from paddler_sync.simulator.payloads import dumps, error_body
from paddler_sync.simulator.tokens import BOS_PIECE, TextGenerator, detokenize, split_pieces, tokenize
from paddler_sync.sockets import peer_has_closed

StartResponse = Callable[..., Callable[[bytes], None]]
JSON = "application/json; charset=utf-8"
PUBLIC_PATHS = frozenset({"/health", "/models", "/v1/models", "/"})
CLIENT_CHECK_INTERVAL = 1.0  # llama.cpp notices a vanished non-stream client on a 1 s wait timeout
N_EMBD = 128


@dataclass
class SimulatorConfig:
    model: str = "models/simulated.gguf"
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


class HttpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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
        if config.dialect == "modern":
            self.routes[("GET", "/v1/health")] = self.health

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
            return self._send_json(start_response, origin, exc.code, error_body(exc.code, exc.message))

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
        return req.json(payloads.models_json(self.config.model, int(self.started), self.config.n_ctx))

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
        return self._respond(req, job, NativeFormat(job, self.config))

    def oai_completion(self, req: Request) -> Any:
        self._refuse_on_embeddings_server()
        body = req.body_json()
        job = self._parse_completion(body, prompt=body.get("prompt", ""),
                                     n_predict_keys=("max_tokens", "n_predict"),
                                     model=body.get("model", "gpt-3.5-turbo"))
        return self._respond(req, job, OpenAIFormat(job, self.config, self._completion_id(), chat=False))

    def chat_completion(self, req: Request) -> Any:
        self._refuse_on_embeddings_server()
        body = req.body_json()
        prompt = chatml(messages_of(body), add_generation_prompt=True)
        job = self._parse_completion(body, prompt=prompt, n_predict_keys=("max_tokens", "n_predict"),
                                     model=body.get("model", "gpt-3.5-turbo"))
        return self._respond(req, job, OpenAIFormat(job, self.config, self._completion_id(), chat=True))

    def _refuse_on_embeddings_server(self) -> None:
        if self.config.embeddings:
            raise HttpError(501, "This server does not support completions. Start it without `--embeddings`")

    def _completion_id(self) -> str:
        return "chatcmpl-" + "".join(self._ids.choices(string.ascii_letters + string.digits, k=32))

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
        return Completion(tokens=tokens, prompt_text=detokenize(tokens), n_predict=n_predict, stream=stream,
                          params=payloads.request_params(n_predict, stream, stop), model=str(model),
                          truncated=truncated)

    def _respond(self, req: Request, job: Completion, fmt: Format) -> Any:
        if job.stream:
            write = req.start_response("200 OK", [
                ("Keep-Alive", "timeout=5, max=100"), ("Content-Type", "text/event-stream"),
                ("Server", "llama.cpp"), ("Access-Control-Allow-Origin", req.origin),
            ])
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
        for token, piece in self._generate(job, outcome):
            yield sse(fmt.partial(token, piece, outcome.n_decoded), self.config.stamp_events)
        yield sse(fmt.final(outcome, stream=True), self.config.stamp_events)
        if fmt.done_marker:
            yield b"data: [DONE]\n\n"

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


class Request:
    """The few things a handler needs from the WSGI environ."""

    __slots__ = ("environ", "origin", "start_response")

    def __init__(self, environ: dict[str, Any], origin: str, start_response: StartResponse) -> None:
        self.environ = environ
        self.origin = origin
        self.start_response = start_response

    @property
    def query(self) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl(self.environ.get("QUERY_STRING", "")))

    def body_json(self) -> dict[str, Any]:
        raw = self.environ["wsgi.input"].read()
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise HttpError(500, nlohmann_parse_error(exc)) from None
        if not isinstance(body, dict):
            raise HttpError(400, "the request body must be a JSON object")
        return body

    def json(self, body: Any, code: int = 200) -> list[bytes]:
        data = dumps(body)
        self.start_response(STATUS[code], common_headers(self.origin, JSON, len(data)))
        return [data]

    def client_gone(self) -> bool:
        sock = self.environ.get("simulator.socket")
        return sock is not None and peer_has_closed(sock)


# --- answer formats ------------------------------------------------------------------------------


class NativeFormat:
    """/completion: partial events with id_slot -1; the last one carries everything; no [DONE]."""

    done_marker = False

    def __init__(self, job: Completion, config: SimulatorConfig) -> None:
        self.job = job

    def partial(self, token: int, piece: str, n_decoded: int) -> dict[str, Any]:
        return {"index": 0, "content": piece, "tokens": [token], "stop": False, "id_slot": -1,
                "tokens_predicted": n_decoded, "tokens_evaluated": len(self.job.tokens)}

    def final(self, o: Outcome, stream: bool = False) -> dict[str, Any]:
        return {
            "index": 0, "content": "" if stream else o.content, "tokens": [], "id_slot": o.slot_id, "stop": True,
            "model": self.job.model, "tokens_predicted": o.n_decoded, "tokens_evaluated": o.n_prompt,
            "generation_settings": self.job.params, "prompt": self.job.prompt_text, "has_new_line": False,
            "truncated": self.job.truncated, "stop_type": "limit", "stopping_word": "",
            "tokens_cached": max(0, o.n_prompt + o.n_decoded - 1),
            "timings": payloads.timings_json(o.n_prompt - o.n_cached, o.prompt_seconds, o.n_decoded,
                                             o.decode_seconds),
        }


class OpenAIFormat:
    """/v1/completions and /v1/chat/completions: OpenAI chunks, usage always on the last, then [DONE]."""

    done_marker = True

    def __init__(self, job: Completion, config: SimulatorConfig, completion_id: str, chat: bool) -> None:
        self.job = job
        self.chat = chat
        self.id = completion_id
        self.fingerprint = config.build_info
        self.created = int(time.time())

    def partial(self, token: int, piece: str, n_decoded: int) -> dict[str, Any]:
        if self.chat:
            return {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": piece}}],
                    "created": self.created, "id": self.id, "model": self.job.model,
                    "system_fingerprint": self.fingerprint, "object": "chat.completion.chunk"}
        return {"choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}],
                "created": self.created, "model": self.job.model, "system_fingerprint": self.fingerprint,
                "object": "text_completion", "id": self.id}

    def final(self, o: Outcome, stream: bool = False) -> dict[str, Any]:
        usage = {"completion_tokens": o.n_decoded, "prompt_tokens": o.n_prompt,
                 "total_tokens": o.n_prompt + o.n_decoded}
        timings = payloads.timings_json(o.n_prompt - o.n_cached, o.prompt_seconds, o.n_decoded, o.decode_seconds)
        if self.chat and stream:
            return {"choices": [{"finish_reason": "length", "index": 0, "delta": {}}], "created": self.created,
                    "id": self.id, "model": self.job.model, "system_fingerprint": self.fingerprint,
                    "object": "chat.completion.chunk", "usage": usage, "timings": timings}
        if self.chat:
            choice = {"finish_reason": "length", "index": 0,
                      "message": {"role": "assistant", "content": o.content}}
            kind = "chat.completion"
        else:
            choice = {"text": "" if stream else o.content, "index": 0, "logprobs": None,
                      "finish_reason": "length"}
            kind = "text_completion"
        return {"choices": [choice], "created": self.created, "model": self.job.model,
                "system_fingerprint": self.fingerprint, "object": kind, "usage": usage, "id": self.id,
                "timings": timings}


Format = NativeFormat | OpenAIFormat


# --- helpers -------------------------------------------------------------------------------------

STATUS = {200: "200 OK", 400: "400 Bad Request", 401: "401 Unauthorized", 404: "404 Not Found",
          500: "500 Internal Server Error", 501: "501 Not Implemented", 503: "503 Service Unavailable"}


def common_headers(origin: str, content_type: str, length: int) -> list[tuple[str, str]]:
    return [("Keep-Alive", "timeout=5, max=100"), ("Content-Type", content_type), ("Server", "llama.cpp"),
            ("Content-Length", str(length)), ("Access-Control-Allow-Origin", origin)]


def closing(start_response: StartResponse) -> StartResponse:
    """Say ``Connection: close`` when the client asked to close, as llama.cpp's HTTP server does."""

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        return start_response(status, [*headers, ("Connection", "close")], exc_info)

    return start


def sse(event: dict[str, Any], stamp: bool) -> bytes:
    if stamp:
        event["stamp_ns"] = time.monotonic_ns()
    return b"data: " + dumps(event) + b"\n\n"


def start_task(slot: Slot, task_id: int, job: Completion) -> None:
    slot.id_task = task_id
    slot.prompt = job.prompt_text
    slot.params = job.params
    slot.n_decoded = 0
    slot.n_remain = job.n_predict
    slot.has_next_token = True


def truncate_prompt(tokens: list[int], n_ctx: int) -> tuple[list[int], bool]:
    """llama.cpp's context shift for a prompt that does not fit: drop whole blocks of half the context."""
    if len(tokens) < n_ctx:
        return tokens, False
    block = max(1, n_ctx // 2)
    erased = (len(tokens) - block) // block
    return tokens[erased * block:], True


def messages_of(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise HttpError(400, "'messages' is required and must be an array of objects")
    return messages


def chatml(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    text = "".join(f"<|im_start|>{m.get('role', 'user')}\n{m.get('content', '')}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def mean(vectors: list[list[float]]) -> list[float]:
    if not vectors:
        return [0.0] * N_EMBD
    return [sum(column) / len(vectors) for column in zip(*vectors, strict=True)]


def nlohmann_parse_error(exc: ValueError) -> str:
    line, column = getattr(exc, "lineno", 1), getattr(exc, "colno", 1)
    reason = getattr(exc, "msg", str(exc))
    return (f"[json.exception.parse_error.101] parse error at line {line}, column {column}: "
            f"syntax error while parsing value - {reason}")
