"""The agent report: the one message agents send, defined once for both sides.

Protocol (documented in docs/reference/protocol.md): every ``--monitoring-interval`` the agent sends
``POST /api/v1/agents/<agent_id>/report`` with this JSON; ``DELETE /api/v1/agents/<agent_id>``
deregisters it. Reports are stateless, so a restarted balancer learns the whole fleet again within
one interval, and an agent that stops reporting is dropped after ``--agent-missed-reports``
intervals. Everything in a report is untrusted: :func:`parse_report` refuses, with a reason, any
report that is malformed, oversized or contradicts itself, and then nothing changes.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from paddler_sync.addresses import AddressError, parse_address
from paddler_sync.errors import Refused
from paddler_sync.protocol.models import LOAD_STATES, LOADED, UNLOADED, Serving, names_for
from paddler_sync.protocol.states import ServerState
from paddler_sync.protocol.supervision import (
    DrainMark,
    SupervisionError,
    SupervisorReport,
    parse_drain,
    parse_supervisor,
)

MAX_REPORT_BYTES = 64 * 1024
MAX_MODELS = 64
MAX_ALIASES = 16
MAX_CONTEXT = 10_000_000
MAX_SLOTS = 4096
MAX_NAME = 128
MAX_TEXT = 1024
AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_INTERVAL, MAX_INTERVAL = 0.05, 3600.0


class ReportError(Refused):
    """A refused report."""


@dataclass(frozen=True)
class ModelReport:
    """One model a server serves: a single-model server's one, or each of a router's."""

    id: str
    aliases: tuple[str, ...] = ()
    path: str | None = None
    status: str = LOADED  # loaded, loading, unloaded or failed (router mode loads models on demand)
    slots_idle: int = 0
    slots_processing: int = 0
    n_ctx: int | None = None  # tokens per slot
    modalities: tuple[str, ...] = ()  # what it takes in, where the server says (text, vision, audio)
    tags: tuple[str, ...] = ()  # llama-server --tags (2026 builds): shown in /v1/models, not matched

    def names(self) -> frozenset[str]:
        return names_for((self.id, *self.aliases, self.path))


@dataclass(frozen=True)
class LedgerEntry:
    """One entry of the ledger made from a report: a server's slots, or a router's slots for one model."""

    key: str
    total: int
    processing: int
    routable: bool
    serving: Serving


@dataclass(frozen=True)
class AgentReport:
    external_llamacpp_addr: str
    monitoring_interval: float
    state: str
    slots_idle: int = 0
    slots_processing: int = 0
    agent_name: str | None = None
    error: str | None = None
    is_authorized: bool | None = None
    is_slots_endpoint_enabled: bool | None = None
    total_slots: int | None = None
    model: str | None = None
    llamacpp_build: str | None = None
    is_sleeping: bool | None = None  # the model is unloaded until a request wakes the server
    slots_sample_age: float | None = None  # seconds from the agent's /slots reading to sending this report
    models: tuple[ModelReport, ...] | None = None  # None: the agent could not tell (or predates models)
    router: bool | None = None  # llama.cpp's router mode: several models, loaded on demand
    models_autoload: bool | None = None  # the router loads a model when a request names it
    supervisor: SupervisorReport | None = None  # the agent runs llama-server itself (--supervise)
    labels: dict[str, str] | None = None  # --label, which fleet-wide desired states select by
    drain: DrainMark | None = None  # the agent's copy of its drain mark (a restarted balancer adopts it)

    @property
    def is_ready(self) -> bool:
        return self.state == ServerState.READY.value

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> AgentReport:
        """A report as :meth:`to_json` wrote it (a shared store's copy): trusted, only rebuilt."""
        models = body.get("models")
        fields = {**body, "models": None if models is None else tuple(
            ModelReport(**{**m, "aliases": tuple(m.get("aliases") or ()), "tags": tuple(m.get("tags") or ()),
                           "modalities": tuple(m.get("modalities") or ())}) for m in models),
                  "supervisor": parse_supervisor(body.get("supervisor")), "drain": parse_drain(body.get("drain"))}
        return cls(**fields)

    def entries(self, agent_id: str, autoload: bool) -> list[LedgerEntry]:
        """The ledger entries this report makes: one for a single-model server (keyed by the agent id), one per
        model for a router (``AGENT/MODEL``). ``autoload``: the balancer may send a request for an unloaded
        router model, which then loads (its entry offers one slot until the model's own slots are seen)."""
        total = self.slots_idle + self.slots_processing
        if not self.router:
            model = self.models[0] if self.models else None
            serving = Serving() if model is None else Serving(model.id, model.names(), n_ctx=model.n_ctx,
                                                              modalities=model.modalities, aliases=model.aliases,
                                                              tags=model.tags)
            return [LedgerEntry(agent_id, total, self.slots_processing, self.is_ready, serving)]
        if not self.models:  # a router with no model yet still answers what names none (/health, /props)
            return [LedgerEntry(agent_id, 0, 0, self.is_ready, Serving(needs_model=True))]
        return [self._router_entry(agent_id, m, autoload and bool(self.models_autoload)) for m in self.models]

    def _router_entry(self, agent_id: str, model: ModelReport, autoload: bool) -> LedgerEntry:
        loadable = autoload and model.status == UNLOADED
        serving = Serving(model.id, model.names(), needs_model=True, state=model.status, n_ctx=model.n_ctx,
                          loadable=loadable, modalities=model.modalities, aliases=model.aliases, tags=model.tags)
        total = 1 if loadable else model.slots_idle + model.slots_processing
        return LedgerEntry(entry_key(agent_id, model.id), total, model.slots_processing,
                    self.is_ready and (model.status == LOADED or loadable), serving)


def entry_key(agent_id: str, model: str | None = None) -> str:
    """A ledger key: the agent id, and for a router's model ``AGENT/MODEL`` (agent ids hold no '/')."""
    return agent_id if model is None else f"{agent_id}/{model}"


def owned_by(key: str, agent_id: str) -> bool:
    return key == agent_id or key.startswith(agent_id + "/")


def agent_of(key: str) -> str:
    return key.split("/", 1)[0]


def check_agent_id(agent_id: str) -> str:
    if not AGENT_ID.match(agent_id):
        raise ReportError(400, "the agent id must be 1 to 64 letters, digits, '.', '_' or '-'")
    return agent_id


def parse_report(raw: bytes) -> AgentReport:
    if len(raw) > MAX_REPORT_BYTES:
        raise ReportError(413, f"a report may have at most {MAX_REPORT_BYTES} bytes, this one has {len(raw)}")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(400, f"the report is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ReportError(400, "the report must be a JSON object")
    known = set(AgentReport.__dataclass_fields__)
    unknown = sorted(set(body) - known)
    if unknown:
        raise ReportError(400, f"unknown report fields: {', '.join(unknown[:5])}")
    report = AgentReport(
        external_llamacpp_addr=_address(body.get("external_llamacpp_addr")),
        monitoring_interval=_interval(body.get("monitoring_interval")),
        state=_state(body.get("state")),
        slots_idle=_slot_count(body, "slots_idle"),
        slots_processing=_slot_count(body, "slots_processing"),
        agent_name=_text(body, "agent_name", MAX_NAME),
        error=_text(body, "error", MAX_TEXT),
        is_authorized=_tristate(body, "is_authorized"),
        is_slots_endpoint_enabled=_tristate(body, "is_slots_endpoint_enabled"),
        total_slots=_optional_slot_count(body, "total_slots"),
        model=_text(body, "model", MAX_TEXT),
        llamacpp_build=_text(body, "llamacpp_build", MAX_NAME),
        is_sleeping=_tristate(body, "is_sleeping"),
        slots_sample_age=_sample_age(body.get("slots_sample_age")),
        models=_models(body.get("models")),
        router=_tristate(body, "router"),
        models_autoload=_tristate(body, "models_autoload"),
        labels=_labels(body.get("labels")),
        **_supervision(body),
    )
    _check_consistent(report)
    _check_models(report)
    return report


def _supervision(body: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"supervisor": parse_supervisor(body.get("supervisor")), "drain": parse_drain(body.get("drain"))}
    except SupervisionError as exc:
        raise ReportError(exc.status, str(exc)) from None


def _labels(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_ALIASES or not all(
            isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= MAX_NAME and len(v) <= MAX_NAME
            for k, v in value.items()):
        raise ReportError(400, f"labels must be an object of at most {MAX_ALIASES} names to short strings")
    return dict(value)


def _models(value: Any) -> tuple[ModelReport, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_MODELS:
        raise ReportError(400, f"models must be a list of at most {MAX_MODELS} models")
    return tuple(_model(item) for item in value)


def _model(item: Any) -> ModelReport:
    if not isinstance(item, dict):
        raise ReportError(400, "each of models must be a JSON object")
    unknown = sorted(set(item) - set(ModelReport.__dataclass_fields__))
    if unknown:
        raise ReportError(400, f"unknown model fields: {', '.join(unknown[:5])}")
    model_id = _text(item, "id", MAX_NAME * 2)
    if not model_id or not model_id.strip():
        raise ReportError(400, "each model needs a non-empty id")
    aliases = item.get("aliases") or []
    if not isinstance(aliases, list) or len(aliases) > MAX_ALIASES or not all(
            isinstance(a, str) and 0 < len(a) <= MAX_NAME * 2 for a in aliases):
        raise ReportError(400, f"a model's aliases must be a list of at most {MAX_ALIASES} names")
    status = item.get("status", LOADED)
    if status not in LOAD_STATES:
        raise ReportError(400, f"a model's status must be one of {', '.join(LOAD_STATES)}")
    n_ctx = item.get("n_ctx")
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 0 < n_ctx <= MAX_CONTEXT):
        raise ReportError(400, f"a model's n_ctx must be a whole number from 1 to {MAX_CONTEXT}")
    modalities = item.get("modalities") or []
    if not isinstance(modalities, list) or len(modalities) > MAX_ALIASES or not all(
            isinstance(m, str) and 0 < len(m) <= MAX_NAME for m in modalities):
        raise ReportError(400, f"a model's modalities must be a list of at most {MAX_ALIASES} names")
    tags = item.get("tags") or []
    if not isinstance(tags, list) or len(tags) > MAX_ALIASES or not all(
            isinstance(t, str) and 0 < len(t) <= MAX_NAME for t in tags):
        raise ReportError(400, f"a model's tags must be a list of at most {MAX_ALIASES} names")
    return ModelReport(model_id, tuple(aliases), _text(item, "path", MAX_TEXT), status,
                       _slot_count(item, "slots_idle"), _slot_count(item, "slots_processing"), n_ctx,
                       tuple(modalities), tuple(tags))


def _check_models(r: AgentReport) -> None:
    models = r.models or ()
    if not r.router and len(models) > 1:
        raise ReportError(400, "contradictory report: several models, but not in router mode")
    if len({m.id for m in models}) != len(models):
        raise ReportError(400, "contradictory report: a model id appears twice")
    if r.router and r.is_ready and (sum(m.slots_idle for m in models) != r.slots_idle
                                    or sum(m.slots_processing for m in models) != r.slots_processing):
        raise ReportError(400, "contradictory report: the router's slots are not the sum of its models' slots")
    if any(m.status != LOADED and m.slots_idle + m.slots_processing for m in models):
        raise ReportError(400, "contradictory report: a model that is not loaded cannot have slots")


def _check_consistent(r: AgentReport) -> None:
    busy = r.slots_idle + r.slots_processing
    if r.is_ready:
        if r.total_slots is not None and r.total_slots != busy:
            raise ReportError(400, f"contradictory report: slots_idle + slots_processing = {busy} "
                                   f"but total_slots = {r.total_slots}")
        if r.is_authorized is False or r.is_slots_endpoint_enabled is False:
            raise ReportError(400, "contradictory report: state 'ready' with llama.cpp refusing access or slots")
        if r.error:
            raise ReportError(400, "contradictory report: state 'ready' with an error")
        if r.is_sleeping and r.slots_processing:
            raise ReportError(400, "contradictory report: a sleeping server with busy slots")
    elif r.is_sleeping:
        raise ReportError(400, f"contradictory report: state '{r.state}' cannot be sleeping")
    elif busy:
        raise ReportError(400, f"contradictory report: state '{r.state}' cannot have usable slots")
    if busy > MAX_SLOTS:
        raise ReportError(400, f"a llama.cpp server has at most {MAX_SLOTS} slots, the report claims {busy}")


def _address(value: Any) -> str:
    if not isinstance(value, str):
        raise ReportError(400, "external_llamacpp_addr must be a string HOST:PORT")
    try:
        addr = parse_address(value)
    except AddressError as exc:
        raise ReportError(400, f"external_llamacpp_addr: {exc}") from None
    if addr.is_aws_placeholder:
        raise ReportError(400, "external_llamacpp_addr must be resolved before it is reported")
    return str(addr)


def _interval(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise ReportError(400, f"monitoring_interval must be a number of seconds from {MIN_INTERVAL} "
                               f"to {MAX_INTERVAL:g}")
    return float(value)


def _sample_age(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_INTERVAL:
        raise ReportError(400, f"slots_sample_age must be a number of seconds from 0 to {MAX_INTERVAL:g}")
    return float(value)


def _state(value: Any) -> str:
    states = [s.value for s in ServerState]
    if value not in states:
        raise ReportError(400, f"state must be one of {', '.join(states)}")
    return str(value)


def _slot_count(body: dict[str, Any], key: str) -> int:
    value = body.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SLOTS:
        raise ReportError(400, f"{key} must be a whole number from 0 to {MAX_SLOTS}")
    return value


def _optional_slot_count(body: dict[str, Any], key: str) -> int | None:
    return None if body.get(key) is None else _slot_count(body, key)


def _text(body: dict[str, Any], key: str, limit: int) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise ReportError(400, f"{key} must be a string of at most {limit} characters")
    return value


def _tristate(body: dict[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ReportError(400, f"{key} must be true, false or null")
    return value
