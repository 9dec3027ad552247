"""What a llama.cpp server says about itself, in every dialect, reduced to one small model.

``/slots`` is the one reliable source of busy slots (``is_processing`` since b4027, ``state`` 0/1
from b3606 to b4026) and of each slot's context; ``/props`` adds the slot total, the model, the build
and whether the server is a *router* (2026 builds started without a model: ``/models`` lists the models
with their status, and each GET names one with ``?model=``; ``autoload=false`` keeps a poll from loading
it); ``/v1/models`` gives a single-model server's id and aliases. Every poll sends
``Connection: close``: a kept-alive poller would pin one of llama.cpp's few HTTP threads
(b4748 serves HTTP from a small thread pool, `--threads-http`, and keeps a connection's thread
while it lives).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from paddler_sync.addresses import Address
from paddler_sync.errors import OWN_ANSWER_HEADER
from paddler_sync.protocol.states import ServerState


@dataclass(frozen=True)
class SlotsReading:
    state: ServerState
    error: str | None = None
    slots_idle: int = 0
    slots_processing: int = 0
    is_sleeping: bool = False  # read from /props (2026 builds); /slots would have woken the server
    n_ctx: int | None = None  # tokens each slot holds (the smallest, should they differ)

    @property
    def is_authorized(self) -> bool | None:
        """Paddler's tri-state: known good, known refused, or not known (error, slots off)."""
        if self.state is ServerState.READY:
            return True
        return False if self.state is ServerState.UNAUTHORIZED else None

    @property
    def is_slots_endpoint_enabled(self) -> bool | None:
        if self.state is ServerState.READY:
            return True
        return False if self.state is ServerState.SLOTS_DISABLED else None


@dataclass(frozen=True)
class Props:
    total_slots: int | None = None
    model: str | None = None
    build: str | None = None
    is_sleeping: bool | None = None  # 2026 builds started with --sleep-idle-seconds unload the model when idle
    router: bool = False  # a 2026 build in router mode (no model of its own; /models lists those it serves)
    modalities: tuple[str, ...] = ()  # from 2026 builds' "modalities": text, and vision / audio where true
    models_autoload: bool | None = None  # the router loads a model when a request names it


@dataclass(frozen=True)
class ListedModel:
    """One model of /v1/models (a single server's) or /models (a router's, with its status)."""

    id: str
    aliases: tuple[str, ...] = ()
    status: str = "loaded"
    path: str | None = None
    modalities: tuple[str, ...] = ()  # a router's "architecture.input_modalities"
    tags: tuple[str, ...] = ()  # the 2026 build's --tags


class MalformedSlots(ValueError):
    pass


def count_slots(body: Any) -> tuple[int, int]:
    """(idle, processing) from a /slots body of any dialect."""
    if not isinstance(body, list):
        raise MalformedSlots("expected a JSON array of slots")
    processing = 0
    for slot in body:
        if not isinstance(slot, dict):
            raise MalformedSlots("expected each slot to be a JSON object")
        if isinstance(slot.get("is_processing"), bool):
            processing += slot["is_processing"]
        elif slot.get("state") in (0, 1) and not isinstance(slot.get("state"), bool):
            processing += slot["state"]
        else:
            raise MalformedSlots("a slot has neither 'is_processing' nor 'state'")
    return len(body) - processing, processing


def slot_context(body: list[Any]) -> int | None:
    """The context each slot holds, from a /slots body (the smallest, should they differ)."""
    sizes = [slot["n_ctx"] for slot in body if isinstance(slot, dict) and isinstance(slot.get("n_ctx"), int)
             and not isinstance(slot.get("n_ctx"), bool) and slot["n_ctx"] > 0]
    return min(sizes) if sizes else None


def parse_props(body: Any) -> Props:
    if not isinstance(body, dict):
        return Props()
    total = body.get("total_slots")
    model = body.get("model_path") or (body.get("default_generation_settings") or {}).get("model")
    build = body.get("build_info")
    sleeping = body.get("is_sleeping")
    autoload = body.get("models_autoload")
    flags = body.get("modalities")
    modalities = ("text", *sorted(k for k, v in flags.items() if v is True)) if isinstance(flags, dict) else ()
    return Props(modalities=modalities,
                 total_slots=total if isinstance(total, int) and not isinstance(total, bool) else None,
                 model=model if isinstance(model, str) and model != "none" else None,
                 build=build if isinstance(build, str) else None,
                 is_sleeping=sleeping if isinstance(sleeping, bool) else None,
                 router=body.get("role") == "router",
                 models_autoload=autoload if isinstance(autoload, bool) else None)


def parse_models(body: Any) -> list[ListedModel] | None:
    """The models of a /v1/models or /models answer (None when it is not one); a router's carry their status
    and the file each loads (its ``--model`` argument)."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    models = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"].strip():
            continue
        aliases = tuple(a for a in item.get("aliases") or () if isinstance(a, str) and a)
        status = item.get("status")
        value = status.get("value") if isinstance(status, dict) else None
        tags = tuple(t for t in item.get("tags") or () if isinstance(t, str) and t)
        models.append(ListedModel(item["id"], aliases, value if isinstance(value, str) else "loaded",
                                  _model_argument(status), _input_modalities(item), tags))
    return models


def _input_modalities(item: dict[str, Any]) -> tuple[str, ...]:
    found = (item.get("architecture") or {}).get("input_modalities") if isinstance(item.get("architecture"), dict) \
        else None
    return tuple(m for m in found if isinstance(m, str)) if isinstance(found, list) else ()


def _model_argument(status: Any) -> str | None:
    args = status.get("args") if isinstance(status, dict) else None
    if not isinstance(args, list):
        return None
    for flag, value in itertools.pairwise(args):
        if flag in ("--model", "-m") and isinstance(value, str):
            return value
    return None


class LlamaCppClient:
    def __init__(self, addr: Address, api_key: str | None, timeout: float) -> None:
        self.addr = addr
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers.update({"Accept": "application/json", "Connection": "close"})
        # one retry of these idempotent GETs covers a connection the server closed as we reused it
        self.session.mount("http://", HTTPAdapter(max_retries=Retry(total=1, connect=0, backoff_factor=0)))
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def read_slots(self, model: str | None = None) -> SlotsReading:
        """``model``: one of a router's (loaded) models; ``autoload=false``, or the poll would load it."""
        url = f"{self.addr.url}/slots" if model is None else \
            f"{self.addr.url}/slots?model={quote(model, safe='')}&autoload=false"
        try:
            response = self.session.get(url, timeout=self.timeout)
        except requests.RequestException as exc:
            return SlotsReading(ServerState.UNREACHABLE, f"request to {url} failed: {_reason(exc)}")
        status = response.status_code
        balancer = response.headers.get(OWN_ANSWER_HEADER)
        if balancer:
            return SlotsReading(ServerState.BALANCER_PORT, f"this address is a paddler-sync balancer's {balancer} "
                                                           f"port, not llama.cpp")
        if status == 401:
            return SlotsReading(ServerState.UNAUTHORIZED, "Unauthorized: llama.cpp refused the API key")
        if status == 501:
            return SlotsReading(ServerState.SLOTS_DISABLED, "Not implemented: llama.cpp serves no /slots")
        if status == 503:
            return SlotsReading(ServerState.LOADING, f"llama.cpp is not ready: {_error_message(response)}")
        if status != 200:
            return SlotsReading(ServerState.UNEXPECTED_STATUS, f"/slots answered HTTP {status}")
        try:
            body = response.json()
            idle, processing = count_slots(body)
        except ValueError as exc:
            return SlotsReading(ServerState.MALFORMED, f"malformed /slots answer: {exc}")
        return SlotsReading(ServerState.READY, None, idle, processing, n_ctx=slot_context(body))

    def read_models(self, router: bool) -> list[ListedModel] | None:
        """A router's /models (with each model's status) or a single server's /v1/models; None when unreadable."""
        try:
            response = self.session.get(f"{self.addr.url}/models" if router else f"{self.addr.url}/v1/models",
                                        timeout=self.timeout)
            return parse_models(response.json()) if response.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None

    def read_props(self) -> Props:
        try:
            response = self.session.get(f"{self.addr.url}/props", timeout=self.timeout)
            return parse_props(response.json()) if response.status_code == 200 else Props()
        except (requests.RequestException, ValueError):
            return Props()


def _error_message(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def _reason(exc: requests.RequestException) -> str:
    """The innermost cause, without urllib3's object reprs."""
    if isinstance(exc, requests.ConnectTimeout | requests.ReadTimeout):
        return "timed out"
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host",
                   "Connection reset", "Remote end closed", "Temporary failure in name resolution"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__
