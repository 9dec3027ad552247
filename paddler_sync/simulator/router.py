"""The simulated llama.cpp *router* (2026 builds started without ``-m``): several models, loaded on demand.

As recorded in tests/captures/2026/9*-router-*.txt: ``/models`` (and ``/v1/models``) list every model
with its status (``unloaded``, ``loading``, ``loaded``); ``/props`` without a model describes the
router; every other GET names its model with ``?model=`` (``autoload=false`` refuses to load it) and
every POST in its body's ``model``; a request without one, or for a model it does not have, gets
400. A request for an unloaded model loads it (``--load-time``), unloading the least recently used
model beyond ``--models-max``. Each loaded model is a modern single-model simulator with its own
slots, answering through the router as llama.cpp's child processes do (chunked, connection closed).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import gevent

from paddler_sync.simulator.app import SimulatorApp
from paddler_sync.simulator.http import JSON, STATUS, HttpError, StartResponse, closing, common_headers
from paddler_sync.simulator.payloads import dumps, error_body

UNLOADED, LOADING, LOADED = "unloaded", "loading", "loaded"


@dataclass
class RoutedModel:
    id: str
    aliases: tuple[str, ...]
    make: Callable[[str], SimulatorApp]  # a fresh single-model server (its slots start empty, as after a load)
    app: SimulatorApp | None = None
    loaded_at: float = 0.0  # when loading ends (monotonic)
    used_at: float = 0.0

    def status(self, now: float) -> str:
        if self.app is None:
            return UNLOADED
        return LOADING if now < self.loaded_at else LOADED

    def load(self, now: float, seconds: float) -> None:
        if self.app is None:
            self.app = self.make(self.id)
            self.loaded_at = now + seconds


class RouterApp:
    def __init__(self, models: list[RoutedModel], load_time: float, models_max: int, autoload: bool,
                 build_info: str = "b0-unknown") -> None:
        self.models = {m.id: m for m in models}
        self.load_time = load_time
        self.models_max = models_max
        self.autoload = autoload
        self.build_info = build_info
        self.started = int(time.time())
        self.loads = 0

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Any:
        origin = environ.get("HTTP_ORIGIN", "")
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        try:
            if method == "GET" and path == "/health":
                return _json(start_response, origin, 200, {"status": "ok"})
            if method == "GET" and path in ("/models", "/v1/models"):
                return _json(start_response, origin, 200, self.listing())
            if method == "POST" and path in ("/models/load", "/models/unload"):
                return self._load_or_unload(environ, start_response, origin, path == "/models/load")
            if method == "GET" and path == "/props" and "model=" not in environ.get("QUERY_STRING", ""):
                return _json(start_response, origin, 200, self.props())
            if method == "GET" and path == "/simulator/stats":
                return _json(start_response, origin, 200, self.stats())
            return self._forward(environ, start_response, method)
        except HttpError as exc:
            return _json(closing(start_response), origin, exc.code, error_body(exc.code, exc.message))

    # --- what the router itself answers ---------------------------------------------------------------

    def listing(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"data": [self._entry(m, now) for m in self.models.values()], "object": "list"}

    def _entry(self, model: RoutedModel, now: float) -> dict[str, Any]:
        status = model.status(now)
        args = ["llama-server", "--host", "127.0.0.1", "--port", "0", "--alias", model.id, "--model",
                f"models/{model.id}.gguf"]
        entry: dict[str, Any] = {
            "id": model.id, "aliases": list(model.aliases), "tags": [], "object": "model", "owned_by": "llamacpp",
            "created": self.started, "status": {"value": status, "args": args,
                                                "preset": f"[{model.id}]\nmodel = models/{model.id}.gguf\n\n"},
            "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
            "source": "models_dir", "can_remove": False}
        if status == LOADED and model.app is not None:
            n_ctx = model.app.engine.slots[0].n_ctx
            entry["meta"] = {"vocab_type": 1, "n_vocab": 32000, "n_ctx": n_ctx, "n_ctx_train": 4096, "n_embd": 64,
                             "n_params": 2130240, "size": 8520960, "ftype": "all F32"}
        return entry

    def props(self) -> dict[str, Any]:
        return {"role": "router", "max_instances": self.models_max, "models_autoload": self.autoload,
                "model_alias": "llama-server", "model_path": "none",
                "default_generation_settings": {"params": None, "n_ctx": 0}, "ui_settings": {},
                "build_info": self.build_info, "cors_proxy_enabled": False}

    def stats(self) -> dict[str, Any]:
        """Not in llama.cpp: for tests and benchmarks, how many loads and each loaded model's counters."""
        return {"loads": self.loads, "models": {
            m.id: None if m.app is None else {**vars(m.app.engine.counters), "total_slots": len(m.app.engine.slots)}
            for m in self.models.values()}}

    def _load_or_unload(self, environ: dict[str, Any], start_response: StartResponse, origin: str,
                        load: bool) -> list[bytes]:
        body = _body_json(environ)
        model = self._model(body.get("model"))
        if load:
            self._load(model)
        else:
            model.app = None
        return _json(start_response, origin, 200, {"success": True})

    # --- requests for one model -------------------------------------------------------------------------

    def _forward(self, environ: dict[str, Any], start_response: StartResponse, method: str) -> Any:
        """To the model's own server, loading it first when allowed; answered as a child process's answer."""
        query = dict(parse_qsl(environ.get("QUERY_STRING", "")))
        if method == "POST":
            raw = environ["wsgi.input"].read()
            environ["wsgi.input"] = io.BytesIO(raw)
            named = _json_object(raw).get("model")
        else:
            named = query.get("model")
        model = self._model(named)
        if model.app is None:
            if not self.autoload or query.get("autoload") in ("false", "0"):
                raise HttpError(400, "model is not loaded")
            self._load(model)
        self._wait_for(model)
        model.used_at = time.monotonic()
        assert model.app is not None
        return _chunked(model.app(environ, _as_child(start_response)))

    def _model(self, named: Any) -> RoutedModel:
        if not isinstance(named, str) or not named:
            raise HttpError(400, "model name is missing from the request")
        for model in self.models.values():
            if named == model.id or named in model.aliases:
                return model
        raise HttpError(400, f"model '{named}' not found")

    def _load(self, model: RoutedModel) -> None:
        now = time.monotonic()
        if model.app is not None:
            return
        loaded = sorted((m for m in self.models.values() if m.app is not None), key=lambda m: m.used_at)
        while len(loaded) >= self.models_max:
            loaded.pop(0).app = None  # the least recently used goes
        model.load(now, self.load_time)
        model.used_at = now
        self.loads += 1

    @staticmethod
    def _wait_for(model: RoutedModel) -> None:
        while model.app is not None and time.monotonic() < model.loaded_at:
            gevent.sleep(max(0.001, model.loaded_at - time.monotonic()))
        if model.app is None:
            raise HttpError(500, "model was unloaded while loading")


def _as_child(start_response: StartResponse) -> StartResponse:
    """The router relays a child's answer chunked, with the connection closed after it."""
    def relay(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        kept = [(k, v) for k, v in headers if k.lower() not in ("content-length", "connection")]
        return start_response(status, [*kept, ("Connection", "close"), ("X-Accel-Buffering", "no")], exc_info)
    return relay


def _chunked(body: Iterable[bytes]) -> Iterator[bytes]:
    """A generator, so the WSGI server frames it chunked as the router does (closing it closes the body)."""
    yield from body


def _json(start_response: StartResponse, origin: str, code: int, body: Any) -> list[bytes]:
    data = dumps(body)
    start_response(STATUS[code], common_headers(origin, JSON, len(data)))
    return [data]


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _body_json(environ: dict[str, Any]) -> dict[str, Any]:
    return _json_object(environ["wsgi.input"].read())
