"""Registered agents: who reported what and when, and when an agent counts as gone.

The registry owns the agents' descriptions (name, state, error, last update); it feeds each
report's slot numbers to the ledger, which owns the slot counts. An agent that misses
``missed_reports`` of its own intervals is dropped, and its server with it. Registrations,
removals and state changes are logged once each.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from paddler_sync.ledger.ledger import Ledger
from paddler_sync.ledger.refusals import StateUnavailable
from paddler_sync.protocol.reports import AgentReport, LedgerEntry, ReportError, owned_by
from paddler_sync.protocol.states import HINTS, ServerState

logger = logging.getLogger("paddler_sync.registry")
TAKEOVER_AFTER_MISSED = 1.5  # a silent agent's address may be claimed by a new agent after this many intervals


@dataclass
class AgentRecord:
    agent_id: str
    report: AgentReport
    first_seen: float
    last_update: float = field(default=0.0)
    reports: int = 0
    draining: bool = False  # no new requests: drained by hand, or applying a desired state


class Registry:
    def __init__(self, ledger: Ledger, missed_reports: int = 3, max_agents: int = 10_000,
                 clock: Callable[[], float] = time.time, models_autoload: bool = True) -> None:
        self.ledger = ledger
        self.models_autoload = models_autoload  # send a request for an unloaded model to a router that loads it
        self.missed_reports = missed_reports
        self.max_agents = max_agents
        self.clock = clock
        self._agents: dict[str, AgentRecord] = {}

    def __len__(self) -> int:
        return len(self._agents)

    def records(self) -> list[AgentRecord]:
        return list(self._agents.values())

    def get(self, agent_id: str) -> AgentRecord | None:
        return self._agents.get(agent_id)

    def apply(self, agent_id: str, report: AgentReport, draining: bool = False) -> bool:
        """Take one report; True when it registered a new agent. Conflicts raise ReportError(409).
        ``draining``: its server takes no new requests (paddler_sync/fleet/rollout.py decides)."""
        now = self.clock()
        record = self._agents.get(agent_id)
        if record is not None and record.report.external_llamacpp_addr != report.external_llamacpp_addr:
            raise ReportError(409, f"agent id {agent_id} is registered for {record.report.external_llamacpp_addr}, "
                                   f"not {report.external_llamacpp_addr}: each agent process needs its own id")
        if record is None:
            self._claim_address(agent_id, report, now)
            if len(self._agents) >= self.max_agents:
                raise ReportError(429, f"the balancer already has {self.max_agents} agents, its limit")
        updated = AgentRecord(agent_id, report, record.first_seen if record else now, now,
                              record.reports + 1 if record else 1, draining)
        self._report_to_ledger(updated)  # first: a shared ledger may refuse it
        if record is None:
            logger.info("registered agent %s%s for llama.cpp at %s (%s)", agent_id, _named(report),
                        report.external_llamacpp_addr, report.state)
        else:
            if record.report.state != report.state:
                _log_state_change(agent_id, record.report, report)
            _log_drain_change(record, draining)
        self._agents[agent_id] = updated
        return updated.reports == 1

    def set_draining(self, agent_id: str, draining: bool) -> bool:
        """Drain (or undrain) at once, without waiting for the agent's next report; False: no such agent."""
        record = self._agents.get(agent_id)
        if record is None:
            return False
        if record.draining != draining:
            _log_drain_change(record, draining)
            record.draining = draining
            self._report_to_ledger(record)
        return True

    def _report_to_ledger(self, record: AgentRecord) -> None:
        """The slot numbers to the ledger, an entry per group of slots (a router has one per model), with the
        record as JSON (a shared store keeps it for every balancer). Entries the report no longer makes go.
        A draining server's entries take no new requests."""
        agent_id, report, now = record.agent_id, record.report, record.last_update
        stored = json.dumps({"report": report.to_json(), "first_seen": record.first_seen, "last_update": now,
                             "reports": record.reports, "draining": record.draining})
        entries = self._entries(agent_id, report)
        for entry in entries:
            self.ledger.report(entry.key, report.external_llamacpp_addr, total=entry.total,
                               processing=entry.processing, routable=entry.routable and not record.draining,
                               sleeping=bool(report.is_sleeping), sampled_at=sampled_at(report, now), record=stored,
                               serving=entry.serving)
        kept = {entry.key for entry in entries}
        for key in self.entries_of(agent_id) - kept:
            self.ledger.remove(key)

    def _entries(self, agent_id: str, report: AgentReport) -> list[LedgerEntry]:
        """The report's entries; when it does not say what the server serves (llama.cpp unreachable, loading, or
        its model list unreadable), what it served stays known, so requests for it wait rather than get 404."""
        entries = report.entries(agent_id, self.models_autoload)
        if report.models is not None:
            return entries
        known = {u.key: u.serving for u in self.ledger.upstreams() if owned_by(u.key, agent_id)}
        if report.router:
            return [LedgerEntry(key, 0, 0, False, serving) for key, serving in known.items()]
        return [replace(entry, serving=known[entry.key]) if entry.key in known else entry for entry in entries]

    def entries_of(self, agent_id: str) -> set[str]:
        """The ledger's entries for this agent's server: its own, or one per model of a router."""
        return {u.key for u in self.ledger.upstreams() if owned_by(u.key, agent_id)}

    def remove(self, agent_id: str, why: str) -> bool:
        return self._remove(agent_id, why, reported_before=None)

    def _remove(self, agent_id: str, why: str, reported_before: float | None) -> bool:
        """With ``reported_before``, only if no balancer heard from the agent since."""
        if agent_id not in self._agents:
            return False
        for key in sorted(self.entries_of(agent_id)) or [agent_id]:  # a router with no model has no entry
            try:
                if reported_before is None:
                    self.ledger.remove(key, agent=agent_id)
                elif not self.ledger.remove_if_silent(key, reported_before, agent=agent_id):
                    return False  # another balancer heard from it meanwhile
            except StateUnavailable:
                self.ledger.forget(key)  # drop it here at least; the store drops it on the next report or expiry
        return self._forget(agent_id, why)

    def _forget(self, agent_id: str, why: str) -> bool:
        record = self._agents.pop(agent_id, None)
        if record is None:
            return False
        logger.info("removed agent %s%s at %s: %s", agent_id, _named(record.report),
                    record.report.external_llamacpp_addr, why)
        return True

    def expire(self) -> list[str]:
        """Drop agents that missed too many reports (unless another balancer heard from them); returns their ids."""
        now = self.clock()
        gone = []
        for record in list(self._agents.values()):
            limit = self.missed_reports * record.report.monitoring_interval
            if now - record.last_update > limit and self._remove(
                    record.agent_id, f"no report for {now - record.last_update:.1f}s ({self.missed_reports} "
                                     f"intervals of {record.report.monitoring_interval:g}s)",
                    reported_before=now - limit):
                gone.append(record.agent_id)
        return gone

    def adopt(self, records: dict[str, str]) -> None:
        """A shared store's records (agents that report to other balancers): newer ones replace this registry's,
        and the ones it lost go."""
        for agent_id, raw in records.items():
            record = record_from_json(agent_id, raw)
            if record is None:
                continue
            mine = self._agents.get(agent_id)
            if mine is None or mine.last_update < record.last_update:
                self._agents[agent_id] = record
        for agent_id in set(self._agents) - set(records):
            del self._agents[agent_id]

    def _claim_address(self, agent_id: str, report: AgentReport, now: float) -> None:
        """One llama.cpp server, one agent: a second live agent for the same address would double its slots."""
        for other in list(self._agents.values()):
            if other.report.external_llamacpp_addr != report.external_llamacpp_addr:
                continue
            silent_for = now - other.last_update
            if silent_for < TAKEOVER_AFTER_MISSED * other.report.monitoring_interval:
                raise ReportError(409, f"llama.cpp at {report.external_llamacpp_addr} is already reported by agent "
                                       f"{other.agent_id}: run one agent per llama.cpp server")
            self.remove(other.agent_id, f"replaced by agent {agent_id} after {silent_for:.1f}s of silence")


def record_from_json(agent_id: str, raw: str) -> AgentRecord | None:
    try:
        body = json.loads(raw)
        return AgentRecord(agent_id, AgentReport.from_json(body["report"]), first_seen=body["first_seen"],
                           last_update=body["last_update"], reports=body["reports"],
                           draining=bool(body.get("draining")))
    except (ValueError, TypeError, KeyError):
        logger.warning("ignored an unreadable record of agent %s in the shared store", agent_id)
        return None


def sampled_at(report: AgentReport, now: float) -> float | None:
    """When the agent read /slots, on the balancer's clock (the report's transit, a millisecond or so, aside)."""
    return None if report.slots_sample_age is None else now - report.slots_sample_age


def _named(report: AgentReport) -> str:
    return f" ({report.agent_name})" if report.agent_name else ""


def _log_drain_change(record: AgentRecord, draining: bool) -> None:
    if record.draining != draining:
        logger.info("agent %s%s at %s: %s", record.agent_id, _named(record.report),
                    record.report.external_llamacpp_addr,
                    "draining: no new requests go there" if draining else "undrained: requests go there again")


def _log_state_change(agent_id: str, before: AgentReport, after: AgentReport) -> None:
    state = ServerState(after.state)
    if state is ServerState.READY:
        logger.info("agent %s%s: llama.cpp is ready again (was %s)", agent_id, _named(after), before.state)
    else:
        logger.warning("agent %s%s: llama.cpp is %s: %s (%s)", agent_id, _named(after), state.value,
                       after.error, HINTS[state])
