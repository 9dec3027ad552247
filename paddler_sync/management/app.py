"""The management server: agent reports in, the fleet's state out (JSON API, health).

Routes:
    POST   /api/v1/agents/<agent_id>/report   an agent report (paddler_sync.protocol.reports)
    DELETE /api/v1/agents/<agent_id>          deregister
    drains and desired states                 paddler_sync/management/supervision.py
    GET    /api/v1/agents                     {"agents": [...]} with Paddler's field names and ours
    GET    /api/v1/tenants                    {"tenants": [...]}: settings, slots held, waiting, usage (--tenants)
    PUT    /api/v1/tenants                    a new tenants file (TOML body): checked, written, in force at once
    GET    /health                            the fleet in one object; 200 while the balancer serves
    GET    /metrics                           Prometheus text format
    GET    /dashboard, /dashboard/fleet       the web dashboard, with --management-dashboard-enable
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException

from paddler_sync.counters import Counters
from paddler_sync.errors import OWN_ANSWER, error_body
from paddler_sync.fleet.rollout import Rollout
from paddler_sync.fleet.status import FleetStatus
from paddler_sync.ledger.refusals import StateUnavailable
from paddler_sync.management import views
from paddler_sync.management.dashboard import create_dashboard
from paddler_sync.management.guard import READ, WRITE, Guard, presented_token
from paddler_sync.management.supervision import add_supervision_routes
from paddler_sync.protocol.reports import MAX_REPORT_BYTES, ReportError, check_agent_id, parse_report
from paddler_sync.tenants.book import TenantBook, TenantsError
from paddler_sync.traffic import DEFAULT_RANGE, RANGES, Traffic


def create_management_app(options: argparse.Namespace, status: FleetStatus, traffic: Traffic,
                          metrics: CollectorRegistry, rollout: Rollout, usage: Callable[[], Counters],
                          replace_tenants: Callable[[str], TenantBook]) -> Flask:
    """The Flask app; each part gets only what it reads (the hub hands them over). ``usage``: the balancer's
    counts; ``replace_tenants``: puts a new tenants file in force (raises TenantsError)."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REPORT_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    guard = Guard(options.management_token, options.management_read_token, options.agent_allowed_networks)
    add_token_check(app, guard)
    add_agent_routes(app, rollout, guard)
    add_supervision_routes(app, rollout, options)
    add_fleet_routes(app, status, traffic, metrics)
    add_tenant_routes(app, status, usage, replace_tenants)
    if options.management_dashboard_enable:
        app.register_blueprint(create_dashboard(status, traffic, usage))
    else:
        @app.get("/dashboard")
        def dashboard_off() -> tuple[Response, int]:
            return _error(404, "the web dashboard is off: start the balancer with --management-dashboard-enable")
    add_error_handlers(app)

    @app.after_request
    def say_who_answers(response: Response) -> Response:
        response.headers[OWN_ANSWER[0]] = "management"  # an agent pointed here says so (paddler_sync/llamacpp.py)
        return response

    return app


def add_token_check(app: Flask, guard: Guard) -> None:
    @app.before_request
    def check_token() -> tuple[Response, int] | None:
        if request.path == "/health" or not guard.enabled:
            return None
        access = READ if request.method in ("GET", "HEAD") else WRITE
        token = presented_token(request.headers.get("Authorization"), request.args.get("token"))
        if guard.allows(token, access):
            return None
        return _error(401, "this management server needs a token: agents and dashboards take it as "
                           "--management-token; HTTP clients send 'Authorization: Bearer <token>'")


def add_agent_routes(app: Flask, rollout: Rollout, guard: Guard) -> None:
    """What agents send: reports (answered with what the operator wants of their server) and deregistrations."""
    registry = rollout.registry

    @app.post("/api/v1/agents/<agent_id>/report")
    def agent_report(agent_id: str) -> tuple[Response, int]:
        try:
            check_agent_id(agent_id)
            report = parse_report(request.get_data(cache=False))
            if not guard.address_allowed(report.external_llamacpp_addr):
                raise ReportError(403, f"{report.external_llamacpp_addr} is outside --agent-allowed-networks")
            control = rollout.control(agent_id, report)
        except ReportError as exc:
            return _error(exc.status, str(exc))
        try:
            registered = registry.apply(agent_id, report, draining=control.draining)
        except ReportError as exc:
            rollout.refused(agent_id)
            return _error(exc.status, str(exc))
        return jsonify({"status": "registered" if registered else "accepted", "agent_id": agent_id,
                        "control": control.to_json()}), 200

    @app.delete("/api/v1/agents/<agent_id>")
    def agent_deregister(agent_id: str) -> tuple[Response, int]:
        if not registry.remove(agent_id, "deregistered by the agent"):
            return _error(404, f"no agent {agent_id} is registered")
        rollout.controls.forget(agent_id)
        return jsonify({"status": "removed", "agent_id": agent_id}), 200


def add_fleet_routes(app: Flask, status: FleetStatus, traffic: Traffic, metrics: CollectorRegistry) -> None:
    """What operators read: the agents, health, traffic figures and Prometheus metrics."""

    @app.get("/api/v1/agents")
    def agents() -> Response:
        return jsonify({"agents": status.agents()})

    @app.get("/api/v1/models")
    def models() -> Response:
        return jsonify({"models": status.models()})

    @app.get("/api/v1/traffic")
    def traffic_figures() -> tuple[Response, int]:
        range_name = request.args.get("range", DEFAULT_RANGE)
        if range_name not in RANGES:
            return _error(400, f"range={range_name!r} is not one of {', '.join(RANGES)}")
        return jsonify(views.traffic_json(traffic, status, range_name)), 200

    @app.get("/health")
    def health() -> tuple[Response, int]:
        body = status.health()
        return jsonify(body), 200 if body["status"] == "ok" else 503

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics), content_type=CONTENT_TYPE_LATEST)


def add_tenant_routes(app: Flask, status: FleetStatus, usage: Callable[[], Counters],
                      replace: Callable[[str], TenantBook]) -> None:
    """The tenants (--tenants): read with the read token, replaced with the management token."""

    @app.get("/api/v1/tenants")
    def tenants() -> tuple[Response, int]:
        if status.tenants is None or status.tenants.book is None:
            return _error(404, "this balancer runs without tenants: start it with --tenants PATH (PADDLER_TENANTS)")
        return jsonify({"tenants": status.tenant_rows(usage())}), 200

    @app.put("/api/v1/tenants")
    def replace_tenants() -> tuple[Response, int]:
        text = request.get_data(cache=False)
        try:
            book = replace(text.decode("utf-8"))
        except UnicodeDecodeError:
            return _error(400, "send the tenants file as UTF-8 TOML text")
        except TenantsError as exc:
            return _error(409 if "without tenants" in str(exc) else 400, str(exc))
        return jsonify({"status": "replaced", "tenants": list(book.tenants)}), 200


def add_error_handlers(app: Flask) -> None:
    @app.errorhandler(StateUnavailable)
    def state_unavailable(exc: StateUnavailable) -> tuple[Response, int]:
        return _error(503, str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        code = exc.code or 500
        if code == 413:
            return _error(413, f"a report (or a tenants file) may have at most {MAX_REPORT_BYTES} bytes")
        return _error(code, exc.description or exc.name)


def _error(code: int, message: str) -> tuple[Response, int]:
    body: dict[str, Any] = error_body(code, message)
    return jsonify(body), code
