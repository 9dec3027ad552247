"""The web dashboard: Flask renders everything server side; the page swaps in a fresh fragment every second.

No front-end build step: one template for the page (with ~30 lines of JavaScript that fetch the
fragment, keep the chosen time range and say when the management server cannot be reached) and one
for the fleet fragment. Charts are SVG drawn here, with real axes. Times are UTC everywhere, said once
in the header. Everything an agent sent is untrusted and Jinja escapes it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, render_template, request, url_for
from markupsafe import Markup, escape

from paddler_sync.counters import Counters
from paddler_sync.fleet.status import FleetStatus
from paddler_sync.management.views import traffic_json
from paddler_sync.traffic import DEFAULT_RANGE, RANGES, Traffic, cache_text, errors_text, rate_text

REFRESH_MS = 1000
PLOT = {"left": 40, "right": 8, "top": 8, "bottom": 20, "width": 420, "height": 150}
LONG_ISSUE = 160  # characters shown before "more"
NOW_SECONDS = 10  # "now" on the traffic cards: the last whole steps of the series that make this long


def create_dashboard(status: FleetStatus, traffic_figures: Traffic, usage: Callable[[], Counters]) -> Blueprint:
    """``usage``: the balancer's counts, for the Tenants table (--tenants)."""
    dashboard = Blueprint("dashboard", __name__, template_folder="templates")
    dashboard.add_app_template_filter(breakable)

    @dashboard.get("/dashboard")
    def page() -> str:
        token = request.args.get("token")  # a browser cannot send a header: the page passes the token on
        fleet_url = url_for("dashboard.fleet", token=token) if token else url_for("dashboard.fleet")
        api_base = url_for("dashboard.page").removesuffix("/dashboard")  # a --management-path-prefix, or ""
        return render_template("dashboard.html", refresh_ms=REFRESH_MS, fleet_url=fleet_url, api_base=api_base,
                               token=token, ranges=list(RANGES), default_range=DEFAULT_RANGE)

    @dashboard.get("/dashboard/fleet")
    def fleet() -> str:
        range_name = request.args.get("range", DEFAULT_RANGE)
        if range_name not in RANGES:
            range_name = DEFAULT_RANGE
        traffic = traffic_json(traffic_figures, status, range_name)
        by_addr = {s["addr"]: s for s in traffic["servers"]}
        agents = [with_display_fields(a, by_addr.get(a["external_llamacpp_addr"])) for a in status.agents()]
        return render_template("fleet.html", agents=agents, health=status.health(), traffic=traffic,
                               models=status.models(), unnamed_waiting=status.waiting_without_model(),
                               tenants=status.tenant_rows(usage()),
                               fleet_figures={**display_figures(traffic["fleet"]),
                                              **current_rates(traffic["series"], range_name)},
                               range_name=range_name,
                               charts=charts(traffic["series"], traffic["step_seconds"]),
                               now=format_time(time.time()))

    return dashboard


def format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds <= 0.001:  # the finest bin: every wait shorter than a millisecond
        return "< 1 ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def display_figures(figures: dict[str, Any] | None) -> dict[str, str]:
    """A server's or the fleet's traffic figures as the table shows them ("-": nothing relayed yet)."""
    if not figures:
        return {"rps": "-", "tps": "-", "ttft_p50": "-", "ttft_p95": "-", "wait_p95": "-", "errors": "none",
                "cache": "-"}
    return {"rps": rate_text(figures["requests_per_second"]), "tps": rate_text(figures["tokens_per_second"]),
            "ttft_p50": format_duration(figures["ttft_p50_seconds"]),
            "ttft_p95": format_duration(figures["ttft_p95_seconds"]),
            "wait_p95": format_duration(figures["queue_wait_p95_seconds"]),
            "errors": errors_text(figures["errors"]), "cache": cache_text(figures)}



def current_rates(series: list[dict[str, Any]], range_name: str) -> dict[str, str]:
    """What flows now, beside the range's means: the rates over the last whole steps of the series that make
    at least NOW_SECONDS (the step still filling left out)."""
    done = [p for p in series[:-1] if p["requests_per_second"] is not None]
    step = series[-1]["width"] if series else 1
    recent = done[-max(1, round(NOW_SECONDS / step)):]
    seconds = step * len(recent)

    def rate(key: str) -> str:
        return rate_text(sum(p[key] * step for p in recent) / seconds) if recent else "-"

    return {"rps_now": rate("requests_per_second"), "tps_now": rate("tokens_per_second"),
            "step": f"{seconds:g} s", "range": "5 min" if range_name == "5m" else "hour"}


def breakable(text: str) -> Markup:
    """A path or id that may wrap after its slashes and underscores, and nowhere inside a word."""
    escaped = escape(text)
    return Markup(escaped.replace("/", Markup("/<wbr>")).replace("_", Markup("_<wbr>")))


def with_display_fields(agent: dict[str, Any], figures: dict[str, Any] | None) -> dict[str, Any]:
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
    issues.extend(supervisor_issues(agent["supervisor"]))
    return {**agent, "issues": [{"text": i, "short": shorten(i)} for i in issues],
            "last_update_text": format_time(agent["last_update"]["secs_since_epoch"]),
            "usage_percent": round(100 * agent["slots_processing"] / total) if total else 0,
            "figures": display_figures(figures)}


def supervisor_issues(supervisor: dict[str, Any] | None) -> list[str]:
    """What the llama-server its agent runs is doing, when that is not simply serving: a swap under way, a
    desired state that failed, a crash."""
    if supervisor is None:
        return []
    issues = []
    if supervisor["state"] != "ready" or supervisor["phase"]:
        issues.append(f"llama-server {supervisor['state'].replace('_', ' ')}: {supervisor['hint']}")
    if supervisor["failed_id"]:
        issues.append(f"Desired state {supervisor['failed_id']} failed ({supervisor['failed_error']}); it runs the "
                      "last command that worked")
    return issues


def shorten(text: str) -> str | None:
    """The start of a long text (the cell shows it, with the whole behind "more"); None when it fits."""
    return text[:LONG_ISSUE].rstrip() + "…" if len(text) > LONG_ISSUE else None


# --- charts ---------------------------------------------------------------------------------------


@dataclass
class Line:
    key: str
    label: str
    color: str
    dashed: bool = False
    area: bool = False


def charts(series: list[dict[str, Any]], step: float) -> list[dict[str, Any]]:
    per = f"{step:g} s"
    waiting = [p["waiting"] for p in series if p["waiting"] is not None]
    return [
        chart("Slots and waiting requests", series, "", [  # the total first: "in use" is drawn over it when full
            Line("slots_total", "slots in all", "#98a2b3", dashed=True),
            Line("slots_busy", f"slots in use (peak per {per})", "#3e63dd", area=True),
            Line("waiting", f"requests waiting (peak {max(waiting, default=0)})", "#c4320a")]),
        chart("Requests per second", series, "/s", [
            Line("requests_per_second", f"requests finished per second (per {per})", "#12805c")]),
        chart("Tokens generated per second", series, "/s", [
            Line("tokens_per_second", f"tokens per second, from llama.cpp's usage (per {per})", "#7a5af8")]),
    ]


def chart(title: str, series: list[dict[str, Any]], unit: str, lines: list[Line]) -> dict[str, Any]:
    """An SVG line chart with a y axis from 0 to a round maximum and a UTC time axis."""
    values = [p[line.key] for p in series for line in lines if p[line.key] is not None]
    top = nice_ceiling(max(values, default=0))
    left, right, upper, lower = (PLOT["left"], PLOT["width"] - PLOT["right"], PLOT["top"],
                                 PLOT["height"] - PLOT["bottom"])
    start, end = (series[0]["at"], series[-1]["at"]) if series else (0, 1)

    def x(at: float) -> float:
        return left + (at - start) / ((end - start) or 1) * (right - left)

    def y(value: float) -> float:
        return lower - value / top * (lower - upper)

    drawn = []
    for line in lines:
        points = [(x(p["at"]), y(p[line.key])) for p in series if p[line.key] is not None]
        path = " ".join(f"{'M' if i == 0 else 'L'}{px:.1f},{py:.1f}" for i, (px, py) in enumerate(points))
        area = f"{path} L{points[-1][0]:.1f},{lower} L{points[0][0]:.1f},{lower} Z" if line.area and points else ""
        drawn.append({"line": line, "path": path, "area": area})
    y_ticks = [{"y": y(v), "label": tick_label(v, unit)} for v in (0, top / 2, top)]
    x_ticks = [{"x": x(at), "label": time.strftime("%H:%M:%S" if end - start <= 600 else "%H:%M", time.gmtime(at)),
                "anchor": "start" if i == 0 else "end" if i == 3 else "middle"}
               for i, at in enumerate(start + (end - start) * k / 3 for k in range(4))]
    return {"title": title, "lines": drawn, "y_ticks": y_ticks, "x_ticks": x_ticks, "plot": PLOT,
            "left": left, "right": right, "lower": lower, "upper": upper, "empty": not values}


def nice_ceiling(value: float) -> float:
    """1, 2, 5 or 10 times a power of ten, at least ``value`` (and at least 1)."""
    if value <= 1:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def tick_label(value: float, unit: str) -> str:
    text = f"{value:g}" if value < 1000 else f"{value / 1000:g}k"
    return text + unit
