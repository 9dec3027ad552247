"""The fleet as the API, the dashboards and the gauges show it: computed in one place, below all three.

The hub builds one :class:`FleetStatus` over the ledger, the registry and the buffer, and hands it to
the management app, the dashboards and the metrics, so none of them needs the hub (or each other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from paddler_sync.fleet.buffer import RequestBuffer
from paddler_sync.fleet.ledger import Ledger
from paddler_sync.fleet.registry import AgentRecord, Registry
from paddler_sync.fleet.upstream import Upstream
from paddler_sync.llamacpp import HINTS, ServerState

if TYPE_CHECKING:
    from paddler_sync.fleet.redis_store import RedisStore


def system_time(seconds: float | None) -> dict[str, int] | None:
    """Paddler's timestamp shape (Rust's SystemTime)."""
    if seconds is None:
        return None
    whole = int(seconds)
    return {"secs_since_epoch": whole, "nanos_since_epoch": int((seconds - whole) * 1e9)}


def agent_json(record: AgentRecord, upstream: Upstream | None, now: float) -> dict[str, Any]:
    report = record.report
    total = upstream.total if upstream else 0
    idle = upstream.free(now) if upstream else 0
    quarantined = upstream.quarantined_until if upstream and upstream.is_quarantined(now) else None
    state = ServerState(report.state)
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
        "state": "quarantined" if quarantined else state.value,
        "hint": HINTS.get(state),
        "total_slots": total,
        "slots_in_flight": upstream.in_flight if upstream else 0,
        "slots_external": upstream.external + upstream.draining if upstream else 0,
        "reported_slots_idle": report.slots_idle,
        "reported_slots_processing": report.slots_processing,
        "model": report.model,
        "llamacpp_build": report.llamacpp_build,
        "is_sleeping": bool(report.is_sleeping),
        "monitoring_interval": report.monitoring_interval,
        "first_seen": system_time(record.first_seen),
    }


class FleetStatus:
    def __init__(self, ledger: Ledger, registry: Registry, buffer: RequestBuffer, shared: RedisStore | None,
                 shutting_down: Callable[[], bool]) -> None:
        self.ledger = ledger
        self.registry = registry
        self.buffer = buffer
        self.shared = shared  # the Redis connection when the ledger is shared there
        self.shutting_down = shutting_down

    def agents(self) -> list[dict[str, Any]]:
        now = self.ledger.clock()
        records = sorted(self.registry.records(), key=lambda r: (r.report.agent_name or "", r.agent_id))
        return [agent_json(r, self.ledger.get(r.agent_id), now) for r in records]

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
            "slots_total": sum(a["total_slots"] for a in agents),
            "slots_idle": sum(a["slots_idle"] for a in agents),
            "slots_processing": sum(a["slots_processing"] for a in agents),
            "requests_in_flight": self.ledger.in_flight(),
            "requests_buffered": self.buffer.waiting,
            "oldest_buffered_seconds": round(self.buffer.oldest_wait(), 3),
            "state_backend": "local" if self.shared is None else "redis",
            "state_backend_reachable": self.shared is None or self.shared.reachable,
        }
