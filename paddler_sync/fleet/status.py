"""The fleet as the API, the dashboards and the gauges show it: computed in one place, below all three.

The hub builds one :class:`FleetStatus` over the ledger, the registry and the buffer, and hands it to
the management app, the dashboards and the metrics, so none of them needs the hub (or each other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from paddler_sync.counters import OUTCOMES, TOKEN_KINDS, Counters
from paddler_sync.fleet.registry import AgentRecord, Registry
from paddler_sync.ledger.buffer import RequestBuffer
from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.slots import Upstream
from paddler_sync.protocol.models import LOADED
from paddler_sync.protocol.reports import owned_by
from paddler_sync.protocol.states import HINTS, ServerState
from paddler_sync.tenants.current import CurrentTenants

DRAINING_HINT = ("draining: no new requests go to this server while the ones it runs finish (a model swap, or "
                 "POST /api/v1/agents/ID/drain; /undrain ends it)")

if TYPE_CHECKING:
    from paddler_sync.ledger.stores.redis.store import RedisStore


def system_time(seconds: float | None) -> dict[str, int] | None:
    """Paddler's timestamp shape (Rust's SystemTime)."""
    if seconds is None:
        return None
    whole = int(seconds)
    return {"secs_since_epoch": whole, "nanos_since_epoch": int((seconds - whole) * 1e9)}


def slots_of(upstream: Upstream, now: float) -> tuple[int, int]:
    """(total, free) as shown: an unloaded router model's one slot is only an offer to load it, not a slot."""
    if upstream.serving.state != LOADED:
        return 0, 0
    return upstream.total, upstream.free(now)


def model_json(upstream: Upstream, now: float) -> dict[str, Any]:
    total, free = slots_of(upstream, now)
    return {"id": upstream.serving.model, "state": upstream.serving.state, "n_ctx": upstream.serving.n_ctx,
            "total_slots": total, "slots_idle": free, "slots_in_flight": upstream.in_flight,
            "names": sorted(upstream.serving.names), "modalities": list(upstream.serving.modalities)}


def agent_json(record: AgentRecord, pools: list[Upstream], now: float) -> dict[str, Any]:
    """An agent as the API shows it; ``pools``: its ledger entries (a router has one per model)."""
    report = record.report
    shown = [slots_of(u, now) for u in pools]
    total, idle = sum(t for t, _ in shown), sum(f for _, f in shown)
    quarantine = [u.quarantined_until for u in pools if u.quarantined_until is not None and u.is_quarantined(now)]
    quarantined = max(quarantine) if quarantine else None
    state = ServerState(report.state)
    shown_as = shown_state(record, quarantined is not None)
    return {
        "agent_id": record.agent_id,
        "agent_name": report.agent_name,
        "error": report.error,
        "external_llamacpp_addr": report.external_llamacpp_addr,
        "is_authorized": report.is_authorized,
        "is_slots_endpoint_enabled": report.is_slots_endpoint_enabled,
        "last_update": system_time(record.last_update),
        "quarantined_until": system_time(quarantined),
        "slots_idle": idle,
        "slots_processing": total - idle if report.is_ready else 0,
        "state": shown_as,
        "hint": DRAINING_HINT if shown_as == "draining" else HINTS.get(state),
        "draining": record.draining,
        "total_slots": total,
        "slots_in_flight": sum(u.in_flight for u in pools),
        "slots_external": sum(u.external + u.lingering for u in pools),
        "reported_slots_idle": report.slots_idle,
        "reported_slots_processing": report.slots_processing,
        "model": report.model,
        "models": [model_json(u, now) for u in sorted(pools, key=lambda u: u.key) if u.serving.model],
        "router": bool(report.router),
        "llamacpp_build": report.llamacpp_build,
        "is_sleeping": bool(report.is_sleeping),
        "monitoring_interval": report.monitoring_interval,
        "first_seen": system_time(record.first_seen),
        "labels": report.labels or {},
        "supervisor": report.supervisor.to_json() if report.supervisor else None,
    }


def shown_state(record: AgentRecord, quarantined: bool) -> str:
    """llama.cpp's state, unless the balancer keeps requests away: quarantined, or draining while ready."""
    if quarantined:
        return "quarantined"
    if record.draining and record.report.is_ready:
        return "draining"
    return record.report.state


def fleet_models(pools: list[Upstream], now: float) -> list[dict[str, Any]]:
    """The fleet's models, each once (by id), with the servers that serve it and their slots: /v1/models."""
    models: dict[str, dict[str, Any]] = {}
    for upstream in sorted(pools, key=lambda u: u.key):
        serving = upstream.serving
        if not serving.model:
            continue
        total, free = slots_of(upstream, now) if upstream.is_usable(now) else (0, 0)
        entry = models.setdefault(serving.model, {"id": serving.model, "names": set(), "aliases": set(),
                                                  "tags": set(), "servers": 0, "servers_loaded": 0,
                                                  "slots_total": 0, "slots_idle": 0, "n_ctx": None})
        entry["names"] |= serving.names
        entry["aliases"] |= set(serving.aliases)
        entry["tags"] |= set(serving.tags)
        entry["servers"] += 1
        entry["servers_loaded"] += int(serving.state == LOADED)
        entry["slots_total"] += total
        entry["slots_idle"] += free
        if serving.n_ctx is not None:
            entry["n_ctx"] = max(entry["n_ctx"] or 0, serving.n_ctx)
    return [{**m, "names": sorted(m["names"]), "aliases": sorted(m["aliases"]), "tags": sorted(m["tags"])}
            for _, m in sorted(models.items())]


class FleetStatus:
    def __init__(self, ledger: Ledger, registry: Registry, buffer: RequestBuffer, shared: RedisStore | None,
                 shutting_down: Callable[[], bool]) -> None:
        self.ledger = ledger
        self.registry = registry
        self.buffer = buffer
        self.shared = shared  # the Redis connection when the ledger is shared there
        self.shutting_down = shutting_down
        self.tenants: CurrentTenants | None = None  # --tenants (the hub sets it)

    def tenant_rows(self, usage: Counters) -> list[dict[str, Any]]:
        """Each tenant of the file in force: its settings (never a key), slots held and requests waiting now, and
        its usage so far (``usage``: the balancer's counts)."""
        book = self.tenants.book if self.tenants is not None else None
        if book is None:
            return []
        held, waiting = self.ledger.held(), self.buffer.waiting_by_tenant()
        return [{**tenant.describe(), "in_flight": held.get(name, 0), "waiting": waiting.get(name, 0),
                 **tenant_usage(usage.tenants.get(name, {}))} for name, tenant in book.tenants.items()]

    def agents(self) -> list[dict[str, Any]]:
        now = self.ledger.clock()
        records = sorted(self.registry.records(), key=lambda r: (r.report.agent_name or "", r.agent_id))
        pools = list(self.ledger.upstreams())
        return [agent_json(r, [u for u in pools if owned_by(u.key, r.agent_id)], now) for r in records]

    def waiting_without_model(self) -> int:
        """Requests waiting that name no model (and no --default-model names one for them)."""
        return self.buffer.waiting_by_model().get(None, 0)

    def models(self) -> list[dict[str, Any]]:
        """The fleet's models, each with its servers, slots and the requests waiting for it."""
        waiting = self.buffer.waiting_by_model()
        return [{**m, "requests_buffered": sum(waiting.get(name, 0) for name in m["names"])}
                for m in fleet_models(list(self.ledger.upstreams()), self.ledger.clock())]

    def agent_names(self) -> dict[str, str | None]:
        """Each server's agent name, by address (the traffic figures know servers by address)."""
        return {r.report.external_llamacpp_addr: r.report.agent_name for r in self.registry.records()}

    def health(self) -> dict[str, Any]:
        agents = self.agents()
        return {
            "status": "shutting_down" if self.shutting_down() else "ok",
            "agents": len(agents),
            "agents_ready": sum(1 for a in agents if a["state"] == ServerState.READY.value),
            "agents_sleeping": sum(1 for a in agents if a["is_sleeping"]),
            "agents_draining": sum(1 for a in agents if a["draining"]),
            "slots_total": sum(a["total_slots"] for a in agents),
            "slots_idle": sum(a["slots_idle"] for a in agents),
            "slots_processing": sum(a["slots_processing"] for a in agents),
            "requests_in_flight": self.ledger.in_flight(),
            "requests_buffered": self.buffer.waiting,
            "oldest_buffered_seconds": round(self.buffer.oldest_wait(), 3),
            "state_backend": "local" if self.shared is None else "redis",
            "state_backend_reachable": self.shared is None or self.shared.reachable,
        }


def tenant_usage(fields: dict[str, float]) -> dict[str, Any]:
    """A tenant's counts (paddler_sync/counters.py's ``tenant_done``) as the API shows them."""
    return {"requests": {outcome: int(fields.get(f"requests:{outcome}", 0)) for outcome in OUTCOMES},
            "tokens": {kind: int(fields.get(f"tokens:{kind}", 0)) for kind in TOKEN_KINDS},
            "slot_seconds": round(fields.get("slot_seconds", 0.0), 3),
            "wait_seconds": round(fields.get("wait_seconds", 0.0), 3),
            "rejections": {key.split(":", 1)[1]: int(value) for key, value in sorted(fields.items())
                           if key.startswith("rejected:")}}
