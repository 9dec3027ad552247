"""The fleet as JSON: one function per document, shared by the API and the dashboards."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from paddler_sync.fleet.ledger import Upstream
from paddler_sync.fleet.registry import AgentRecord
from paddler_sync.llamacpp import HINTS, ServerState
from paddler_sync.traffic import RANGES

if TYPE_CHECKING:
    from paddler_sync.balancer import Balancer


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


def agents_json(balancer: Balancer) -> list[dict[str, Any]]:
    now = balancer.ledger.clock()
    records = sorted(balancer.registry.records(), key=lambda r: (r.report.agent_name or "", r.agent_id))
    return [agent_json(r, balancer.ledger.get(r.agent_id), now) for r in records]


def health_json(balancer: Balancer) -> dict[str, Any]:
    agents = agents_json(balancer)
    return {
        "status": "shutting_down" if balancer.shutting_down else "ok",
        "agents": len(agents),
        "agents_ready": sum(1 for a in agents if a["state"] == ServerState.READY.value),
        "agents_sleeping": sum(1 for a in agents if a["is_sleeping"]),
        "slots_total": sum(a["total_slots"] for a in agents),
        "slots_idle": sum(a["slots_idle"] for a in agents),
        "slots_processing": sum(a["slots_processing"] for a in agents),
        "requests_in_flight": balancer.ledger.in_flight(),
        "requests_buffered": balancer.buffer.waiting,
        "oldest_buffered_seconds": round(balancer.buffer.oldest_wait(), 3),
        "state_backend": "local" if balancer.shared is None else "redis",
        "state_backend_reachable": balancer.shared is None or balancer.shared.state.reachable,
    }


def traffic_json(balancer: Balancer, range_name: str) -> dict[str, Any]:
    """What went through this balancer over the range: the fleet, each server (named by its agent), a series."""
    now = time.time()
    summary = balancer.traffic.summary(range_name, now)
    names = {r.report.external_llamacpp_addr: r.report.agent_name for r in balancer.registry.records()}
    seconds, step = RANGES[range_name]
    return {
        "range": range_name,
        "range_seconds": seconds,
        "step_seconds": step,
        "time_zone": "UTC",
        "now": now,
        "fleet": summary["fleet"],
        "servers": [{"addr": addr, "agent_name": names.get(addr), **figures}
                    for addr, figures in sorted(summary["servers"].items())],
        "series": balancer.traffic.series(range_name, now),
    }
