"""The web dashboard: Flask renders everything server side; the page swaps in a fresh fragment every second.

No front-end build step: one template for the page (with ~20 lines of JavaScript that fetch the
fragment and say when the management server cannot be reached) and one for the fleet fragment.
Everything an agent sent is untrusted and Jinja escapes it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from flask import Blueprint, render_template, request, url_for

from paddler_sync.management.views import agents_json, health_json

if TYPE_CHECKING:
    from paddler_sync.balancer import Balancer
    from paddler_sync.metrics import History

REFRESH_MS = 1000
CHART_WIDTH, CHART_HEIGHT = 600, 120


def create_dashboard(balancer: Balancer) -> Blueprint:
    dashboard = Blueprint("dashboard", __name__, template_folder="templates")

    @dashboard.get("/dashboard")
    def page() -> str:
        token = request.args.get("token")  # a browser cannot send a header: the page passes the token on
        fleet_url = url_for("dashboard.fleet", token=token) if token else url_for("dashboard.fleet")
        return render_template("dashboard.html", refresh_ms=REFRESH_MS, fleet_url=fleet_url)

    @dashboard.get("/dashboard/fleet")
    def fleet() -> str:
        agents = [with_display_fields(a) for a in agents_json(balancer)]
        return render_template("fleet.html", agents=agents, health=health_json(balancer),
                               chart=chart(balancer.history), now=format_time(time.time()))

    return dashboard


def format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def with_display_fields(agent: dict[str, Any]) -> dict[str, Any]:
    total = agent["total_slots"]
    quarantined = agent["quarantined_until"]
    issues: list[str] = []
    if quarantined:
        issues.append(f"Quarantined until {format_time(quarantined['secs_since_epoch'])}: it refused a connection")
    if agent.get("is_sleeping"):
        issues.append("Sleeping: the model is unloaded; it gets requests only when no awake server has a free slot")
    if agent["state"] not in ("ready", "quarantined"):
        issues.append(agent["hint"] or agent["state"])
        if agent["error"]:
            issues.append(agent["error"])
    return {**agent, "issues": issues, "last_update_text": format_time(agent["last_update"]["secs_since_epoch"]),
            "usage_percent": round(100 * agent["slots_processing"] / total) if total else 0}


def chart(history: History) -> dict[str, Any]:
    """SVG polylines of slots in use, total slots and requests waiting, scaled to the chart box."""
    samples = list(history.samples)
    if len(samples) < 2:
        return {"busy": "", "total": "", "buffered": "", "peak": 0, "span": ""}
    peak = max(max(s.slots_total, s.buffered, s.slots_busy) for s in samples) or 1
    span = samples[-1].at - samples[0].at or 1

    def line(values: list[int]) -> str:
        return " ".join(f"{(s.at - samples[0].at) / span * CHART_WIDTH:.1f},"
                        f"{CHART_HEIGHT - v / peak * (CHART_HEIGHT - 4) - 2:.1f}" for s, v in zip(samples, values,
                                                                                              strict=True))

    return {"busy": line([s.slots_busy for s in samples]), "total": line([s.slots_total for s in samples]),
            "buffered": line([s.buffered for s in samples]), "peak": peak,
            "span": f"{span:.0f} s" if span < 120 else f"{span / 60:.0f} min"}
