"""The agent report: the one message agents send, defined once for both sides.

Protocol (documented in the README): every ``--monitoring-interval`` the agent sends
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
from paddler_sync.llamacpp import ServerState

MAX_REPORT_BYTES = 16 * 1024
MAX_SLOTS = 4096
MAX_NAME = 128
MAX_TEXT = 1024
AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_INTERVAL, MAX_INTERVAL = 0.05, 3600.0


class ReportError(ValueError):
    """A refused report: ``status`` is the HTTP status to answer, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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

    @property
    def is_ready(self) -> bool:
        return self.state == ServerState.READY.value

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
    )
    _check_consistent(report)
    return report


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
