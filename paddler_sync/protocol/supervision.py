"""What a supervising agent and the balancer tell each other: desired states, drains and the supervisor's state.

The balancer answers every report with a :class:`Control`: whether the server drains, and which desired
state to apply now. The agent reports back what runs (:class:`SupervisorReport`), including the desired
state it works on and its copy of the drain mark: so a balancer that restarts learns both from the
next report (:func:`newer`) and a swap in progress resumes instead of being forgotten half-done.
Newer always wins, by the time it was set on the balancer.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from paddler_sync.errors import Refused

STARTING, LOADING, READY, CRASHED, RESTARTING, BACKING_OFF, STOPPING = (
    "starting", "loading", "ready", "crashed", "restarting", "backing_off", "stopping")
STATES = (STARTING, LOADING, READY, CRASHED, RESTARTING, BACKING_OFF, STOPPING)
STATE_HINTS = {
    STARTING: "llama-server was started and does not answer HTTP yet",
    LOADING: "llama-server answers 503 while it loads the model",
    READY: "llama-server answers and its slots are seen",
    CRASHED: "llama-server exited or stopped answering; see the agent's log for its last lines",
    RESTARTING: "llama-server is being stopped and started again (a crash, or a new desired state)",
    BACKING_OFF: "llama-server failed again; the agent waits before the next attempt (doubling each time)",
    STOPPING: "the agent is stopping: it drains, then stops llama-server",
}
PHASES = ("draining", "stopping", "starting", "rolling_back")
MAX_ARGS = 256
MAX_ARG = 4096
MAX_ERROR = 2000
MAX_DESIRED_BYTES = 8192  # agents carry it in every report (three times at most), which may have 64 KiB


class SupervisionError(Refused):
    """A refused desired state or supervisor report."""


@dataclass(frozen=True)
class DesiredState:
    """What llama-server should run: ``args`` replace the supervised command's options, ``model`` its -m.
    ``scope`` fleet: set for every supervising agent whose labels include ``selector``."""

    id: str
    set_at: float
    model: str | None = None
    args: tuple[str, ...] | None = None
    scope: str = "agent"
    selector: dict[str, str] = field(default_factory=dict)
    drain_timeout: float = 60.0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "set_at": self.set_at, "model": self.model,
                "args": None if self.args is None else list(self.args), "scope": self.scope,
                "selector": dict(self.selector), "drain_timeout": self.drain_timeout}

    def selects(self, labels: dict[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.selector.items())

    def describe(self) -> str:
        parts = [f"model {self.model}"] if self.model else []
        if self.args is not None:
            parts.append("args " + " ".join(self.args))
        return ", ".join(parts) or "the supervised command as given"


def desired_from_request(body: Any, scope: str, drain_timeout: float, now: float | None = None) -> DesiredState:
    """A PUT body: ``model`` and/or ``args``, optionally ``drain_timeout`` (and ``selector`` for the fleet)."""
    if not isinstance(body, dict):
        raise SupervisionError(400, "the desired state must be a JSON object with 'model' and/or 'args'")
    allowed = {"model", "args", "drain_timeout"} | ({"selector"} if scope == "fleet" else set())
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise SupervisionError(400, f"unknown desired state fields: {', '.join(unknown)} (expected "
                                    f"{', '.join(sorted(allowed))})")
    if body.get("model") is None and body.get("args") is None:
        raise SupervisionError(400, "a desired state needs 'model' (a model file for -m) or 'args' (llama-server's "
                                    "options, a list of strings), or both")
    if len(json.dumps(body)) > MAX_DESIRED_BYTES:
        raise SupervisionError(400, f"a desired state may have at most {MAX_DESIRED_BYTES} bytes of JSON")
    stamp = time.time() if now is None else now
    return parse_desired({**body, "id": f"{int(stamp * 1000):x}-{uuid.uuid4().hex[:6]}", "set_at": stamp,
                          "scope": scope, "drain_timeout": body.get("drain_timeout", drain_timeout)})


def parse_desired(body: Any) -> DesiredState:
    """A desired state as JSON (from a request, a report or a store); checked, since reports are untrusted."""
    if not isinstance(body, dict):
        raise SupervisionError(400, "a desired state must be a JSON object")
    model, args, selector = body.get("model"), body.get("args"), body.get("selector") or {}
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= MAX_ARG):
        raise SupervisionError(400, f"'model' must be a non-empty string of at most {MAX_ARG} characters")
    if args is not None and (not isinstance(args, list) or len(args) > MAX_ARGS
                             or not all(isinstance(a, str) and len(a) <= MAX_ARG for a in args)):
        raise SupervisionError(400, f"'args' must be a list of at most {MAX_ARGS} strings (llama-server's options, "
                                    "without the program)")
    if not isinstance(selector, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in selector.items()):
        raise SupervisionError(400, "'selector' must be an object of label names to values, e.g. {\"gpu\": \"a100\"}")
    timeout = body.get("drain_timeout")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout <= 86400:
        raise SupervisionError(400, "'drain_timeout' must be a number of seconds from 0 to 86400")
    ident, set_at = body.get("id"), body.get("set_at")
    if not isinstance(ident, str) or not 0 < len(ident) <= 64 or isinstance(set_at, bool) \
            or not isinstance(set_at, int | float):
        raise SupervisionError(400, "a desired state needs its 'id' and 'set_at'")
    scope = body.get("scope", "agent")
    if scope not in ("agent", "fleet"):
        raise SupervisionError(400, "'scope' must be agent or fleet")
    return DesiredState(ident, float(set_at), model, None if args is None else tuple(args), scope, dict(selector),
                        float(timeout))


@dataclass(frozen=True)
class DrainMark:
    """Whether a server drains, and when that was decided (the newer mark wins)."""

    on: bool = False
    seq: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"on": self.on, "seq": self.seq}


def parse_drain(body: Any) -> DrainMark | None:
    if body is None:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("on"), bool) or isinstance(body.get("seq"), bool) \
            or not isinstance(body.get("seq"), int | float):
        raise SupervisionError(400, "drain must be {\"on\": true|false, \"seq\": NUMBER}")
    return DrainMark(body["on"], float(body["seq"]))


@dataclass(frozen=True)
class SupervisorReport:
    """A supervising agent's account of its llama-server. ``applied``: the desired state running now (None: the
    command the agent was started with); ``working_on``: one it is applying (``phase`` says how far);
    ``failed_id``: the last one that failed to load, after which the agent went back to ``applied``."""

    state: str
    hint: str = ""
    pid: int | None = None
    restarts: int = 0
    command: tuple[str, ...] = ()
    applied: DesiredState | None = None
    working_on: DesiredState | None = None
    phase: str | None = None
    failed_id: str | None = None
    failed_error: str | None = None
    recovered_in: float | None = None

    @property
    def applied_id(self) -> str | None:
        return self.applied.id if self.applied else None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "hint": self.hint, "pid": self.pid, "restarts": self.restarts,
                "command": list(self.command), "applied": self.applied.to_json() if self.applied else None,
                "working_on": self.working_on.to_json() if self.working_on else None, "phase": self.phase,
                "failed_id": self.failed_id, "failed_error": self.failed_error, "recovered_in": self.recovered_in}


def parse_supervisor(body: Any) -> SupervisorReport | None:
    if body is None:
        return None
    if not isinstance(body, dict):
        raise SupervisionError(400, "supervisor must be a JSON object")
    unknown = sorted(set(body) - set(SupervisorReport.__dataclass_fields__))
    if unknown:
        raise SupervisionError(400, f"unknown supervisor fields: {', '.join(unknown[:5])}")
    if body.get("state") not in STATES:
        raise SupervisionError(400, f"supervisor state must be one of {', '.join(STATES)}")
    if body.get("phase") is not None and body.get("phase") not in PHASES:
        raise SupervisionError(400, f"supervisor phase must be one of {', '.join(PHASES)}")
    command = body.get("command") or []
    if not isinstance(command, list) or len(command) > MAX_ARGS or not all(
            isinstance(a, str) and len(a) <= MAX_ARG for a in command):
        raise SupervisionError(400, "supervisor command must be a list of strings")
    pid, restarts, recovered = body.get("pid"), body.get("restarts", 0), body.get("recovered_in")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int)):
        raise SupervisionError(400, "supervisor pid must be a whole number or null")
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise SupervisionError(400, "supervisor restarts must be a whole number")
    if recovered is not None and (isinstance(recovered, bool) or not isinstance(recovered, int | float)):
        raise SupervisionError(400, "supervisor recovered_in must be a number of seconds or null")
    return SupervisorReport(
        body["state"], _short(body.get("hint")) or "", pid, restarts, tuple(command),
        None if body.get("applied") is None else parse_desired(body["applied"]),
        None if body.get("working_on") is None else parse_desired(body["working_on"]),
        body.get("phase"), _short(body.get("failed_id")), _short(body.get("failed_error")),
        None if recovered is None else float(recovered))


def _short(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SupervisionError(400, "supervisor texts must be strings")
    return value[:MAX_ERROR]


@dataclass(frozen=True)
class Control:
    """The balancer's answer to a report: drain or not; a desired state to apply now; the requests this
    balancer still has running on the server (the agent stops llama-server only when none remain)."""

    drain: DrainMark = DrainMark()
    apply: DesiredState | None = None
    in_flight: int = 0

    @property
    def draining(self) -> bool:
        """No new requests for this server: drained by hand, or about to apply a desired state."""
        return self.drain.on or self.apply is not None

    def to_json(self) -> dict[str, Any]:
        return {"drain": self.drain.to_json(), "apply": self.apply.to_json() if self.apply else None,
                "in_flight": self.in_flight}

    @classmethod
    def from_json(cls, body: Any) -> Control | None:
        """The agent's reading of a report's answer (None: an older balancer, or nothing to say)."""
        if not isinstance(body, dict):
            return None
        try:
            apply = None if body.get("apply") is None else parse_desired(body["apply"])
            return cls(parse_drain(body.get("drain")) or DrainMark(), apply, int(body.get("in_flight") or 0))
        except (SupervisionError, TypeError, ValueError):
            return None


def newer(mine: DesiredState | None, theirs: DesiredState | None) -> DesiredState | None:
    """The desired state set last."""
    if mine is None or (theirs is not None and theirs.set_at > mine.set_at):
        return theirs
    return mine
