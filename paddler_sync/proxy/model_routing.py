"""Routing by model: which model a request is for, whether the fleet serves it, and the fleet's /v1/models.

    route          the model a request names (body ``model`` of a POST, ``?model=`` of a GET), or
                   --default-model when it names none; a name no server answers to is ignored, as
                   llama.cpp ignores it, where every server that could take the request would ignore it
                   (no router among them: the fleet's one model, or --default-model's servers); else
                   404 (listing the fleet's models), unless --buffer-unknown-models; 400 for a
                   slot-taking request without one when every server is a router; the context it needs
                   (paddler_sync/proxy/context_fit.py)
    models_answer  GET /v1/models and /models: the fleet's models, answered by the balancer itself
    named_body     a request that named no model, sent to a router under --default-model, gets it added

Matching ignores case; paddler_sync/protocol/models.py says exactly what a server answers to. For the first
--models-discovery-time seconds after start, before every agent has reported, a request for a model not
seen yet waits (up to that time) instead of getting 404.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from paddler_sync.endings import Ending
from paddler_sync.fleet.status import fleet_models
from paddler_sync.ledger.slots import Reservation
from paddler_sync.protocol.models import normalize
from paddler_sync.proxy.ask import Ask, BadAsk, json_mistake, read_ask
from paddler_sync.proxy.context_fit import ContextCheck, ContextTooLong
from paddler_sync.proxy.refusal import ProxyError

if TYPE_CHECKING:
    from paddler_sync.ledger.ledger import Ledger

MODEL_LIST_PATHS = frozenset({"/v1/models", "/models"})
LISTED_IN_ERRORS = 20


@dataclass(frozen=True)
class Route:
    ask: Ask
    model: str | None = None  # normalized; None: any server that needs no model named
    need: int | None = None  # context in tokens, when known
    wait_for_discovery: float | None = None  # an unknown model, while agents report: wait at most this long
    router: bool = False  # a router's own business (/models/load, DELETE /models...): to a router, any model


def is_router_business(path: str) -> bool:
    """llama.cpp's router mode manages its models under /models: the model these name is acted on, not served."""
    return path.rstrip("/") == "/models" or path.startswith("/models/")



class ModelRouting:
    def __init__(self, options: argparse.Namespace, ledger: Ledger, context: ContextCheck,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ledger
        self.context = context
        self.clock = clock
        self.default_model: str | None = options.default_model
        self.buffer_unknown = options.buffer_unknown_models
        self.discovered_at = clock() + options.models_discovery_time
        self.started = time.time()

    def route(self, method: str, environ: dict[str, Any], body: bytes, takes_slot: bool) -> Route:
        try:
            ask = read_ask(method, environ.get("QUERY_STRING", ""), body)
        except BadAsk as exc:
            raise ProxyError(400, str(exc), ending=Ending.BAD_MODEL) from None
        # a body read_ask could not take for a JSON object is parsed again, to say where it broke (the
        # well-formed ones, nearly all, are parsed once)
        mistake = json_mistake(body, environ.get("CONTENT_TYPE", "")) if takes_slot and ask.body is None else None
        if mistake:
            raise ProxyError(400, mistake, ending=Ending.BAD_JSON)
        if not takes_slot and is_router_business(environ.get("PATH_INFO") or "/") and self.ledger.has_router():
            return Route(ask, ask.model, router=True)
        default = normalize(self.default_model) if self.default_model else None
        model = ask.model or default
        if (model is not None and model != default and not self.buffer_unknown and not self.ledger.knows(model)
                and self._name_ignored(default)):
            model = default  # as llama.cpp would: the server that takes it ignores the name
        wait = self._check_known(model, ask, takes_slot)
        if not takes_slot:
            return Route(ask, model)
        try:
            need = self.context.need(ask, model, _client_headers(environ)) if wait is None else None
        except ContextTooLong as exc:
            raise ProxyError(400, str(exc), ending=Ending.CONTEXT_TOO_LONG, code="context_length_exceeded",
                             extra=exc.fields()) from None
        return Route(ask, model, need, wait)

    def _name_ignored(self, default: str | None) -> bool:
        """Whether every server that could take a request naming a model nobody serves would ignore the name, as
        a llama-server that is no router does: the servers of ``default`` (--default-model), or else the whole
        fleet when it serves one model. A router among them refuses a model it does not know, and when the fleet
        serves several models the name is what decides between them: those keep the 404. Under
        --buffer-unknown-models a name nobody serves yet is a server still starting: it waits for it."""
        servers = [u.serving for u in self.ledger.upstreams() if default is None or u.serving.serves(default)]
        if not servers or any(s.needs_model for s in servers):
            return False
        return default is not None or len({s.model for s in servers if s.model is not None}) <= 1

    def _check_known(self, model: str | None, ask: Ask, takes_slot: bool) -> float | None:
        """None when the request may be routed now; while agents are still being discovered, how long it may
        wait for its model to appear. Raises the 404 / 400 a request gets that no server can serve."""
        if model is None:
            if takes_slot and self.ledger.needs_model():
                raise ProxyError(400, f"this request names no model, and every server of the fleet serves several: "
                                      f"name one of {self._listing()} in 'model' (or start the balancer with "
                                      f"--default-model)", ending=Ending.BAD_MODEL, code="model_required")
            return None
        if self.ledger.knows(model) or self.buffer_unknown:
            return None
        left = self.discovered_at - self.clock()
        if left > 0:
            return left
        raise self.unknown(ask.named or model)

    def unknown(self, named: str) -> ProxyError:
        return ProxyError(404, f"the model '{named}' is not served by any server of this fleet; it serves "
                               f"{self._listing()} (GET /v1/models lists them)", ending=Ending.UNKNOWN_MODEL,
                          code="model_not_found", extra={"models": self._model_ids()})

    def knows(self, model: str | None) -> bool:
        return model is None or self.ledger.knows(model)

    def _model_ids(self) -> list[str]:
        return [m["id"] for m in fleet_models(list(self.ledger.upstreams()), self.ledger.clock())]

    def _listing(self) -> str:
        ids = self._model_ids()
        if not ids:
            return "no model yet (no agent has reported one)"
        shown = ", ".join(f"'{i}'" for i in ids[:LISTED_IN_ERRORS])
        return shown + (f" and {len(ids) - LISTED_IN_ERRORS} more" if len(ids) > LISTED_IN_ERRORS else "")

    # --- the fleet's own model list ----------------------------------------------------------------------------

    def lists_models(self, method: str, path: str, query: str) -> bool:
        """GET /v1/models, and /models where no router is in the fleet: a router's /models is its own API (each
        model's status, its arguments; ?reload=1), forwarded to a router like the rest of its business."""
        if method != "GET" or path.rstrip("/") not in MODEL_LIST_PATHS or "model=" in query:
            return False
        return path.rstrip("/") == "/v1/models" or not self.ledger.has_router()

    def models_answer(self) -> bytes:
        """The OpenAI list shape, each model with its aliases and tags as llama.cpp lists them and, under
        ``paddler``, its servers and slots."""
        created = int(self.started)
        data = [{"id": m["id"], "object": "model", "created": created, "owned_by": "llamacpp",
                 "aliases": m["aliases"], "tags": m["tags"],
                 "paddler": {k: m[k] for k in ("servers", "servers_loaded", "slots_total", "slots_idle", "n_ctx")}}
                for m in fleet_models(list(self.ledger.upstreams()), self.ledger.clock())]
        return json.dumps({"object": "list", "data": data}).encode()

    # --- a model added for a router ------------------------------------------------------------------------------

    def named_body(self, route: Route, reservation: Reservation, body: bytes) -> bytes:
        """A request under --default-model that named none, sent to a router: the router needs the model's id."""
        serving = reservation.upstream.serving
        if (route.model is None or route.ask.named is not None or not serving.needs_model or not serving.model
                or route.ask.body is None):
            return body
        return json.dumps({**route.ask.body, "model": serving.model}).encode()

    def named_target(self, route: Route, reservation: Reservation, target: str, method: str) -> str:
        serving = reservation.upstream.serving
        if (method == "POST" or route.model is None or route.ask.named is not None or not serving.needs_model
                or not serving.model):
            return target
        return f"{target}{'&' if '?' in target else '?'}model={quote(serving.model, safe='')}"


def _client_headers(environ: dict[str, Any]) -> dict[str, str]:
    auth = environ.get("HTTP_AUTHORIZATION")
    return {"Authorization": auth} if auth else {}
