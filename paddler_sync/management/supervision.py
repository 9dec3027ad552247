"""The operator's hand on the fleet: drains, and desired states that swap llama-server's model.

Routes (write token required for PUT and POST when tokens are set):
    POST /api/v1/agents/<agent_id>/drain            no new requests for that server; those running finish
    POST /api/v1/agents/<agent_id>/undrain          requests go there again
    GET  /api/v1/agents/<agent_id>/desired_state    desired against applied, and where the agent stands
    PUT  /api/v1/agents/<agent_id>/desired_state    {"model": ..., "args": [...], "drain_timeout": s}
    GET  /api/v1/desired_state                      the fleet-wide desired state and each agent's progress
    PUT  /api/v1/desired_state                      the same body, with "selector": {"label": "value"}
"""

from __future__ import annotations

import argparse
from typing import Any

from flask import Flask, Response, jsonify, request

from paddler_sync.errors import error_body
from paddler_sync.fleet.rollout import Rollout
from paddler_sync.protocol.supervision import SupervisionError, desired_from_request


def add_supervision_routes(app: Flask, rollout: Rollout, options: argparse.Namespace) -> None:
    registry = rollout.registry

    @app.post("/api/v1/agents/<agent_id>/drain")
    def drain(agent_id: str) -> tuple[Response, int]:
        return _set_drain(rollout, agent_id, True)

    @app.post("/api/v1/agents/<agent_id>/undrain")
    def undrain(agent_id: str) -> tuple[Response, int]:
        return _set_drain(rollout, agent_id, False)

    @app.get("/api/v1/agents/<agent_id>/desired_state")
    def agent_desired(agent_id: str) -> tuple[Response, int]:
        record = registry.get(agent_id)
        if record is None:
            return _error(404, f"no agent {agent_id} is registered")
        return jsonify(rollout.agent_status(record)), 200

    @app.put("/api/v1/agents/<agent_id>/desired_state")
    def put_agent_desired(agent_id: str) -> tuple[Response, int]:
        record = registry.get(agent_id)
        if record is None:
            return _error(404, f"no agent {agent_id} is registered")
        if record.report.supervisor is None:
            return _error(409, f"agent {agent_id} does not run llama-server itself: start it with "
                               "`paddler-sync agent --supervise -- llama-server ...` to change its model from here")
        try:
            desired = desired_from_request(request.get_json(silent=True), "agent", options.drain_timeout)
        except SupervisionError as exc:
            return _error(exc.status, str(exc))
        rollout.set_desired(agent_id, desired)
        return jsonify({**rollout.agent_status(record), "desired": desired.to_json()}), 202

    @app.get("/api/v1/desired_state")
    def fleet_desired() -> Response:
        return jsonify(rollout.fleet_status())

    @app.put("/api/v1/desired_state")
    def put_fleet_desired() -> tuple[Response, int]:
        try:
            desired = desired_from_request(request.get_json(silent=True), "fleet", options.drain_timeout)
        except SupervisionError as exc:
            return _error(exc.status, str(exc))
        selected = rollout.set_fleet(desired)
        return jsonify({"desired": desired.to_json(), "agents": selected,
                        "max_unavailable": rollout.max_unavailable}), 202


def _set_drain(rollout: Rollout, agent_id: str, on: bool) -> tuple[Response, int]:
    """Recorded for every balancer and worker, applied here at once (the others follow the agent's next report)."""
    if rollout.registry.get(agent_id) is None:
        return _error(404, f"no agent {agent_id} is registered")
    mark = rollout.set_drain(agent_id, on)
    draining = rollout.draining(agent_id)
    rollout.registry.set_draining(agent_id, draining)
    return jsonify({"agent_id": agent_id, "draining": draining, "drain": mark.to_json(),
                    "requests_in_flight": rollout.in_flight(agent_id)}), 200


def _error(code: int, message: str) -> tuple[Response, int]:
    body: dict[str, Any] = error_body(code, message)
    return jsonify(body), code
