"""Desired states and drains: which server drains, which applies a new model, and how many at once.

The operator sets a desired state for one agent, or for the fleet (every supervising agent whose labels
match); drains and undrains servers by hand. Each report is answered from here (:meth:`Rollout.control`):
an agent whose llama-server differs from its desired state is told to apply it, and drains meanwhile, if
fewer than ``--max-unavailable`` other agents are applying one (a *grant*, held until the agent reports
the state applied or failed). A fleet-wide state that failed on one server (it rolled back) is not
started on others: the same bad model would fail there too.

The controls live in a :class:`Controls` store: this process (one worker), or Redis (shared by every
worker and balancer). Agents carry their copy, so a balancer that restarts adopts it from their reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from paddler_sync.fleet.registry import AgentRecord, Registry
from paddler_sync.ledger.ledger import Ledger
from paddler_sync.protocol.reports import AgentReport, owned_by
from paddler_sync.protocol.supervision import Control, DesiredState, DrainMark, SupervisorReport, newer

GRANT_MIN_SECONDS = 30.0
GRANT_INTERVALS = 10  # a grant lapses when its agent is silent for this many intervals (or 30 s)


@dataclass
class AgentControl:
    """What the operator wants of one agent's server."""

    drain: DrainMark = field(default_factory=DrainMark)
    desired: DesiredState | None = None


class Controls(Protocol):
    def agent(self, agent_id: str) -> AgentControl: ...

    def set_agent(self, agent_id: str, control: AgentControl) -> None: ...

    def fleet(self) -> DesiredState | None: ...

    def set_fleet(self, desired: DesiredState) -> None: ...

    def grant(self, agent_id: str, desired_id: str, limit: int | None, busy: set[str], now: float,
              ttl: float) -> bool:
        """Let the agent apply ``desired_id`` if fewer than ``limit`` others hold a grant or are ``busy`` applying
        one (None: no limit); renews its own. Atomic across every worker sharing the store."""
        ...

    def release(self, agent_id: str) -> None: ...

    def forget(self, agent_id: str) -> None:
        """The agent left: its controls and grant go (a new agent process has a new id)."""
        ...

    def granted(self, now: float) -> dict[str, str]:
        """Agent id -> the desired state it may apply now."""
        ...


class LocalControls:
    """The controls of a balancer with the in-process ledger (lost on restart: agents carry their copies)."""

    def __init__(self) -> None:
        self._agents: dict[str, AgentControl] = {}
        self._fleet: DesiredState | None = None
        self._grants: dict[str, tuple[str, float]] = {}  # agent id -> (desired id, expires at)

    def agent(self, agent_id: str) -> AgentControl:
        control = self._agents.get(agent_id)
        return AgentControl(control.drain, control.desired) if control else AgentControl()

    def set_agent(self, agent_id: str, control: AgentControl) -> None:
        self._agents[agent_id] = control

    def fleet(self) -> DesiredState | None:
        return self._fleet

    def set_fleet(self, desired: DesiredState) -> None:
        self._fleet = desired

    def grant(self, agent_id: str, desired_id: str, limit: int | None, busy: set[str], now: float,
              ttl: float) -> bool:
        self._grants = {a: g for a, g in self._grants.items() if g[1] > now}
        others = (set(self._grants) | busy) - {agent_id}
        if agent_id not in self._grants and limit is not None and len(others) >= limit:
            return False
        self._grants[agent_id] = (desired_id, now + ttl)
        return True

    def release(self, agent_id: str) -> None:
        self._grants.pop(agent_id, None)

    def forget(self, agent_id: str) -> None:
        self._grants.pop(agent_id, None)
        self._agents.pop(agent_id, None)

    def granted(self, now: float) -> dict[str, str]:
        return {a: g[0] for a, g in self._grants.items() if g[1] > now}


class Rollout:
    def __init__(self, controls: Controls, registry: Registry, ledger: Ledger, max_unavailable: int,
                 drain_timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.controls = controls
        self.registry = registry
        self.ledger = ledger
        self.max_unavailable = max_unavailable
        self.drain_timeout = drain_timeout  # the default of a desired state's own
        self.clock = clock

    # --- answering a report ---------------------------------------------------------------------------

    def control(self, agent_id: str, report: AgentReport) -> Control:
        """The answer to this report: the drain mark, and a desired state to apply now (then it drains too)."""
        mine = self._adopt(agent_id, report)
        in_flight = self.in_flight(agent_id)
        supervisor = report.supervisor
        if supervisor is None:  # nothing to apply: only the drain mark
            return Control(mine.drain, None, in_flight)
        target = self.target(mine, report.labels or {})
        if target is None or settled(supervisor, target) or self.failed_elsewhere(target):
            self.controls.release(agent_id)
            return Control(mine.drain, None, in_flight)
        limit = self.max_unavailable if target.scope == "fleet" else None  # one server, the operator's own call
        ttl = max(GRANT_MIN_SECONDS, GRANT_INTERVALS * report.monitoring_interval)
        if self.controls.grant(agent_id, target.id, limit, self._applying(agent_id), self.clock(), ttl):
            return Control(mine.drain, target, in_flight)
        return Control(mine.drain, None, in_flight)

    def refused(self, agent_id: str) -> None:
        """The report was refused after all: a grant given to an agent the registry does not know goes."""
        if self.registry.get(agent_id) is None:
            self.controls.release(agent_id)

    def _adopt(self, agent_id: str, report: AgentReport) -> AgentControl:
        """Newer marks and desired states the agent carries (this balancer restarted, or another one set them)."""
        mine = self.controls.agent(agent_id)
        changed = False
        if report.drain is not None and report.drain.seq > mine.drain.seq:
            mine.drain, changed = report.drain, True
        supervisor = report.supervisor
        for carried in (supervisor.working_on, supervisor.applied) if supervisor else ():
            if carried is None:
                continue
            if carried.scope == "fleet":
                if newer(self.controls.fleet(), carried) is carried:
                    self.controls.set_fleet(carried)
            elif newer(mine.desired, carried) is carried:
                mine.desired, changed = carried, True
        if changed:
            self.controls.set_agent(agent_id, mine)
        return mine

    def target(self, mine: AgentControl, labels: dict[str, str]) -> DesiredState | None:
        """The agent's own desired state or the fleet's (when it selects the agent), whichever was set last."""
        fleet = self.controls.fleet()
        return newer(mine.desired, fleet if fleet is not None and fleet.selects(labels) else None)

    def failed_elsewhere(self, target: DesiredState) -> bool:
        """A fleet-wide state that some server could not load: the rollout stops there."""
        return target.scope == "fleet" and any(
            r.report.supervisor is not None and r.report.supervisor.failed_id == target.id
            for r in self.registry.records())

    def _applying(self, agent_id: str) -> set[str]:
        """Other agents that report a desired state in progress."""
        return {r.agent_id for r in self.registry.records() if r.agent_id != agent_id
                and r.report.supervisor is not None and r.report.supervisor.working_on is not None}

    def in_flight(self, agent_id: str) -> int:
        return sum(u.in_flight for u in self.ledger.upstreams() if owned_by(u.key, agent_id))

    def draining(self, agent_id: str) -> bool:
        """Drained by hand, or applying a desired state."""
        return self.controls.agent(agent_id).drain.on or agent_id in self.controls.granted(self.clock())

    # --- the operator's requests ----------------------------------------------------------------------

    def set_drain(self, agent_id: str, on: bool) -> DrainMark:
        mine = self.controls.agent(agent_id)
        mine.drain = DrainMark(on, max(self.clock(), mine.drain.seq + 1e-6))
        self.controls.set_agent(agent_id, mine)
        return mine.drain

    def set_desired(self, agent_id: str, desired: DesiredState) -> None:
        mine = self.controls.agent(agent_id)
        mine.desired = desired
        self.controls.set_agent(agent_id, mine)

    def set_fleet(self, desired: DesiredState) -> list[str]:
        """The supervising agents it selects now (agents that join later get it too)."""
        self.controls.set_fleet(desired)
        return [r.agent_id for r in self.registry.records()
                if r.report.supervisor is not None and desired.selects(r.report.labels or {})]

    # --- what the API shows -----------------------------------------------------------------------------

    def agent_status(self, record: AgentRecord, granted: dict[str, str] | None = None) -> dict[str, Any]:
        """Desired against applied, for one agent (``granted``: the grants, read once for a whole fleet)."""
        granted = self.controls.granted(self.clock()) if granted is None else granted
        mine = self.controls.agent(record.agent_id)
        supervisor = record.report.supervisor
        target = self.target(mine, record.report.labels or {})
        return {"agent_id": record.agent_id, "agent_name": record.report.agent_name,
                "desired": target.to_json() if target else None,
                "applied": supervisor.applied.to_json() if supervisor and supervisor.applied else None,
                "status": progress(supervisor, target, record.agent_id in granted,
                                   self.failed_elsewhere(target) if target else False),
                "draining": mine.drain.on or record.agent_id in granted, "drain": mine.drain.to_json(),
                "supervisor": supervisor.to_json() if supervisor else None}

    def fleet_status(self) -> dict[str, Any]:
        fleet, granted = self.controls.fleet(), self.controls.granted(self.clock())
        agents = [self.agent_status(r, granted) for r in sorted(self.registry.records(), key=lambda r: r.agent_id)
                  if r.report.supervisor is not None]
        counts: dict[str, int] = {}
        for agent in agents:
            counts[agent["status"]] = counts.get(agent["status"], 0) + 1
        return {"desired": fleet.to_json() if fleet else None, "max_unavailable": self.max_unavailable,
                "counts": counts, "agents": agents}


def settled(supervisor: SupervisorReport, target: DesiredState) -> bool:
    """Nothing to do: the target runs, or it failed to load here (the agent rolled back)."""
    return supervisor.applied_id == target.id or supervisor.failed_id == target.id


def progress(supervisor: SupervisorReport | None, target: DesiredState | None, granted: bool,
             halted: bool) -> str:
    """One word for where an agent stands: unsupervised, as_started, applied, failed, applying, halted or
    pending (waiting for its turn)."""
    if supervisor is None:
        return "unsupervised"
    if target is None:
        return "as_started"
    if supervisor.applied_id == target.id:
        return "applied"
    if supervisor.failed_id == target.id:
        return "failed"
    if (supervisor.working_on is not None and supervisor.working_on.id == target.id) or granted:
        return "applying"
    return "halted" if halted else "pending"
