"""The management API refuses bad reports with a reason, and a refused report changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from paddler_sync.balancer import Balancer
from paddler_sync.settings import parse_settings
from tests.helpers import good_report


@pytest.fixture
def balancer() -> Balancer:
    return Balancer(parse_settings("balancer", args=[], config_files=[]))


@pytest.fixture
def client(balancer: Balancer) -> FlaskClient:
    return balancer.management.test_client()


def agents(client: FlaskClient) -> list[dict[str, Any]]:
    return client.get("/api/v1/agents").get_json()["agents"]


def test_a_good_report_registers_then_updates(client: FlaskClient) -> None:
    first = client.post("/api/v1/agents/agent-1/report", json=good_report())
    assert first.status_code == 200 and first.get_json()["status"] == "registered"
    again = client.post("/api/v1/agents/agent-1/report", json=good_report(slots_idle=4, slots_processing=0))
    assert again.get_json()["status"] == "accepted"
    (row,) = agents(client)
    assert (row["slots_idle"], row["slots_processing"], row["total_slots"]) == (4, 0, 4)


BAD = [
    (b"{not json", 400, "not JSON"),
    (json.dumps([1, 2]).encode(), 400, "JSON object"),
    (json.dumps(good_report(slots_idle=-1)).encode(), 400, "slots_idle"),
    (json.dumps(good_report(slots_idle=10**9)).encode(), 400, "slots_idle"),
    (json.dumps(good_report(slots_idle="3")).encode(), 400, "slots_idle"),
    (json.dumps(good_report(slots_idle=True)).encode(), 400, "slots_idle"),
    (json.dumps(good_report(total_slots=9)).encode(), 400, "contradictory"),
    (json.dumps(good_report(state="unreachable")).encode(), 400, "contradictory"),
    (json.dumps(good_report(is_authorized=False)).encode(), 400, "contradictory"),
    (json.dumps(good_report(state="sleeping")).encode(), 400, "state"),
    (json.dumps(good_report(external_llamacpp_addr="nowhere")).encode(), 400, "external_llamacpp_addr"),
    (json.dumps(good_report(monitoring_interval=0)).encode(), 400, "monitoring_interval"),
    (json.dumps(good_report(agent_name="x" * 500)).encode(), 400, "agent_name"),
    (json.dumps(good_report(surprise=1)).encode(), 400, "unknown report fields"),
    (json.dumps(good_report(model="m" * 70000)).encode(), 413, "at most"),
]


@pytest.mark.parametrize("body,status,reason", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_reports_are_refused_with_a_reason_and_change_nothing(client: FlaskClient, body: bytes, status: int,
                                                                  reason: str) -> None:
    client.post("/api/v1/agents/agent-1/report", json=good_report())
    before = agents(client)
    response = client.post("/api/v1/agents/agent-1/report", data=body, content_type="application/json")
    assert response.status_code == status
    error = response.get_json()["error"]
    assert reason in error["message"] and error["type"] and error["code"]
    after = agents(client)
    assert after == before


def test_another_agents_id_is_a_conflict(client: FlaskClient) -> None:
    client.post("/api/v1/agents/agent-1/report", json=good_report())
    response = client.post("/api/v1/agents/agent-1/report",
                           json=good_report(external_llamacpp_addr="127.0.0.1:9999"))
    assert response.status_code == 409
    assert "each agent process needs its own id" in response.get_json()["error"]["message"]
    assert agents(client)[0]["external_llamacpp_addr"] == "127.0.0.1:9001"


def test_a_second_live_agent_for_one_server_is_refused(client: FlaskClient) -> None:
    client.post("/api/v1/agents/agent-1/report", json=good_report())
    response = client.post("/api/v1/agents/agent-2/report", json=good_report())
    assert response.status_code == 409 and "one agent per llama.cpp server" in response.get_json()["error"]["message"]
    assert [a["agent_id"] for a in agents(client)] == ["agent-1"]


def test_a_silent_agents_server_can_be_taken_over(client: FlaskClient, balancer: Balancer) -> None:
    client.post("/api/v1/agents/agent-1/report", json=good_report(monitoring_interval=0.05))
    balancer.registry.get("agent-1").last_update -= 1.0  # silent for 20 intervals
    assert client.post("/api/v1/agents/agent-2/report", json=good_report()).status_code == 200
    assert [a["agent_id"] for a in agents(client)] == ["agent-2"]


def test_bad_agent_id(client: FlaskClient) -> None:
    response = client.post("/api/v1/agents/" + "x" * 100 + "/report", json=good_report())
    assert response.status_code == 400


def test_deregister(client: FlaskClient) -> None:
    client.post("/api/v1/agents/agent-1/report", json=good_report())
    assert client.delete("/api/v1/agents/agent-1").status_code == 200
    assert client.delete("/api/v1/agents/agent-1").status_code == 404
    assert agents(client) == []


def test_unknown_route_and_method_are_json(client: FlaskClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404 and response.get_json()["error"]["type"] == "not_found_error"
    response = client.put("/api/v1/agents")
    assert response.status_code == 405 and "error" in response.get_json()


def test_health_counts_the_fleet(client: FlaskClient) -> None:
    client.post("/api/v1/agents/agent-1/report", json=good_report())
    client.post("/api/v1/agents/agent-2/report", json=good_report(
        external_llamacpp_addr="127.0.0.1:9002", state="unauthorized", slots_idle=0, slots_processing=0,
        total_slots=None, is_authorized=False, is_slots_endpoint_enabled=None, error="Unauthorized"))
    health = client.get("/health").get_json()
    assert health == {"status": "ok", "agents": 2, "agents_ready": 1, "agents_sleeping": 0, "agents_draining": 0,
                      "slots_total": 4, "slots_idle": 3, "slots_processing": 1, "requests_in_flight": 0,
                      "requests_buffered": 0,
                      "oldest_buffered_seconds": 0.0, "state_backend": "local", "state_backend_reachable": True}


def test_a_sleeping_server_is_shown_as_such_and_contradictions_are_refused(client: FlaskClient) -> None:
    assert client.post("/api/v1/agents/agent-1/report", json=good_report(
        slots_idle=4, slots_processing=0, is_sleeping=True)).status_code == 200
    row = client.get("/api/v1/agents").get_json()["agents"][0]
    assert row["is_sleeping"] is True and row["state"] == "ready"
    assert client.get("/health").get_json()["agents_sleeping"] == 1
    from paddler_sync.management.dashboard import with_display_fields
    from paddler_sync.tui import issues_text

    assert any("Sleeping" in issue["text"] for issue in with_display_fields(row, None)["issues"])
    assert issues_text(row).startswith("Sleeping")
    busy = client.post("/api/v1/agents/agent-2/report", json=good_report(
        external_llamacpp_addr="127.0.0.1:9002", is_sleeping=True))  # good_report has a busy slot
    assert busy.status_code == 400 and "sleeping" in busy.get_json()["error"]["message"]
