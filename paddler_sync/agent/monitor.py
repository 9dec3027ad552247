"""The agent's loop: poll llama.cpp, report to the balancer, say what changed, once.

Reports are stateless and periodic, so a balancer restart needs nothing from the agent: the next
report registers it again. The balancer answers each report with what the operator wants of the
server (drain, a desired state): a supervising agent (paddler_sync/agent/supervisor.py) acts on it.
"""

from __future__ import annotations

import logging
import time

import requests
from gevent.event import Event

from paddler_sync.addresses import Address
from paddler_sync.agent.supervisor import Supervisor
from paddler_sync.llamacpp import ListedModel, LlamaCppClient, Props, SlotsReading
from paddler_sync.protocol.models import FAILED, LOAD_STATES, LOADED
from paddler_sync.protocol.reports import AgentReport, ModelReport
from paddler_sync.protocol.states import HINTS, ServerState
from paddler_sync.protocol.supervision import Control, DrainMark
from paddler_sync.words import counted

logger = logging.getLogger("paddler_sync.agent")
PROPS_REFRESH_SECONDS = 60.0
REPORT_TIMEOUT_SECONDS = 3.0


class BalancerClient:
    """Sends reports to the management server and logs when it becomes (un)reachable, once each time."""

    def __init__(self, management: Address, agent_id: str, prefix: str | None = None, token: str | None = None,
                 timeout: float = REPORT_TIMEOUT_SECONDS) -> None:
        self.url = f"{management.url}{prefix or ''}/api/v1/agents/{agent_id}"
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self._last_problem: str | None = "never reported"
        self.control: Control | None = None  # the balancer's answer to the last report that got through
        self.reachable = False  # the last report got through

    def report(self, report: AgentReport) -> bool:
        try:
            response = self.session.post(f"{self.url}/report", json=report.to_json(), timeout=self.timeout)
        except requests.RequestException as exc:
            self._problem(f"cannot reach the balancer at {self.url}: {type(exc).__name__}; retrying every interval")
            self.reachable = False
            return False
        self.reachable = response.status_code < 400
        if response.status_code >= 400:
            self._problem(f"the balancer refused the report (HTTP {response.status_code}): {_reason(response)}")
            return False
        if self._last_problem is not None:
            logger.info("reporting to the balancer at %s", self.url.rsplit("/api/v1/agents/", 1)[0])
            self._last_problem = None
        self.control = Control.from_json(_answer(response).get("control"))
        return True

    def drain(self) -> int | None:
        """Ask the balancer to send nothing new; the requests it still has running there (None: it did not say)."""
        try:
            response = self.session.post(f"{self.url}/drain", timeout=self.timeout)
        except requests.RequestException as exc:
            logger.warning("could not ask the balancer to drain this server: %s", type(exc).__name__)
            return None
        if response.status_code >= 400:
            logger.warning("the balancer refused to drain this server (HTTP %d): %s", response.status_code,
                           _reason(response))
            return None
        in_flight = _answer(response).get("requests_in_flight")
        return in_flight if isinstance(in_flight, int) else None

    def deregister(self) -> None:
        try:
            self.session.delete(self.url, timeout=self.timeout)
            logger.info("deregistered from the balancer")
        except requests.RequestException as exc:
            logger.warning("could not deregister from the balancer: %s", type(exc).__name__)

    def _problem(self, text: str) -> None:
        if text != self._last_problem:
            logger.warning("%s", text)
            self._last_problem = text


class Agent:
    def __init__(self, llamacpp: LlamaCppClient, balancer: BalancerClient, external_addr: Address,
                 interval: float, name: str | None = None, sleep_idle: float = 0.0,
                 supervisor: Supervisor | None = None, labels: dict[str, str] | None = None) -> None:
        self.supervisor = supervisor
        self.labels = labels
        self.drain = DrainMark()  # the balancer's mark, carried back in every report
        self.last_reading: SlotsReading | None = None
        self.llamacpp = llamacpp
        self.balancer = balancer
        self.external_addr = external_addr
        self.interval = interval
        self.name = name
        self.sleep_idle = sleep_idle  # llama-server's --sleep-idle-seconds (0: it never sleeps)
        self.props = Props()
        self.listed: list[ListedModel] | None = None  # a single server's /v1/models, read with /props
        self._props_read_at = float("-inf")
        self._last_state: ServerState | None = None
        self._last_state_changed = True
        self._state_changed_at = float("-inf")
        self._last_slots: SlotsReading | None = None
        self._last_slots_at = float("-inf")
        self._read_at = time.monotonic()  # when the reading being reported came back from /slots

    def run(self, stop: Event) -> None:
        """Tick on a fixed cadence (no drift); a slow tick skips the beats it overran."""
        due = time.monotonic()
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick must not silence the agent for good
                logger.exception("monitoring tick failed; trying again next interval")
            due += self.interval
            now = time.monotonic()
            if due < now:
                due = now + self.interval - (now - due) % self.interval
            stop.wait(due - now)

    def tick(self) -> AgentReport:
        if self._props_stale():
            self._read_props()
        if self.props.router:
            reading, models = self._read_router()
        else:
            if self.sleep_idle:
                reading = self._read_slots_letting_it_sleep()
            else:
                reading, self._read_at = self.llamacpp.read_slots(), time.monotonic()
            models = self._single_model(reading)
        self._note_state(reading)
        if self._last_state_changed and reading.state is ServerState.READY and not self.props.router:
            self._read_props()  # what it serves now: a (re)started server may have loaded another model
            models = self._single_model(reading)
        self.last_reading = reading
        if self.supervisor is not None:
            self.supervisor.step(reading)
        report = self.build_report(reading, models)
        if self.balancer.report(report):
            self._follow(self.balancer.control)
        return report

    def _follow(self, control: Control | None) -> None:
        if control is None:
            return
        if control.drain.seq > self.drain.seq:
            self.drain = control.drain
        if self.supervisor is not None:
            self.supervisor.follow(control)

    def _read_props(self) -> None:
        self.props = self.llamacpp.read_props()
        if not self.props.router and self.props != Props():
            self.listed = self.llamacpp.read_models(router=False)
        self._props_read_at = time.monotonic()

    def _single_model(self, reading: SlotsReading) -> tuple[ModelReport, ...] | None:
        """The one model a single server serves: its /v1/models id and aliases, its path, its slots' context."""
        listed = self.listed[0] if self.listed else None
        model_id = listed.id if listed else self.props.model
        if not model_id:
            return None
        return (ModelReport(model_id, listed.aliases if listed else (), self.props.model, LOADED,
                            reading.slots_idle, reading.slots_processing, reading.n_ctx, self.props.modalities,
                            listed.tags if listed else ()),)

    def _read_router(self) -> tuple[SlotsReading, tuple[ModelReport, ...] | None]:
        """A router: its models and their status from /models, then /slots of each loaded one (never loading one)."""
        listed = self.llamacpp.read_models(router=True)
        if listed is None:  # /slots says why, in the words every other state uses
            return self.llamacpp.read_slots(), None
        models = tuple(self._router_model(m) for m in listed)
        self._read_at = time.monotonic()
        return SlotsReading(ServerState.READY, None, sum(m.slots_idle for m in models),
                            sum(m.slots_processing for m in models)), models

    def _router_model(self, listed: ListedModel) -> ModelReport:
        status = listed.status if listed.status in LOAD_STATES else FAILED
        if status != LOADED:
            return ModelReport(listed.id, listed.aliases, listed.path, status, modalities=listed.modalities,
                               tags=listed.tags)
        slots = self.llamacpp.read_slots(listed.id)
        if slots.state is not ServerState.READY:  # unloaded between the two reads, or still starting
            return ModelReport(listed.id, listed.aliases, listed.path, "loading", modalities=listed.modalities,
                               tags=listed.tags)
        return ModelReport(listed.id, listed.aliases, listed.path, LOADED, slots.slots_idle, slots.slots_processing,
                           slots.n_ctx, listed.modalities, listed.tags)

    def _read_slots_letting_it_sleep(self) -> SlotsReading:
        """For a server that sleeps when idle: every /slots (and /metrics) request wakes it and restarts its
        idle timer, /props does neither. So /props is read every tick; /slots only while the server is awake
        and was last seen busy, or once the idle time has passed: an idle server is left alone long enough
        to fall asleep. Meanwhile the balancer counts its own requests exactly; load from elsewhere on an
        idle, awake server goes unseen for at most --llamacpp-sleep-idle-seconds + one interval."""
        self.props = self.llamacpp.read_props()
        self._props_read_at = time.monotonic()
        last = self._last_slots
        if self.props.is_sleeping and self.props.total_slots:
            self._read_at = time.monotonic()
            return SlotsReading(ServerState.READY, None, self.props.total_slots, 0, is_sleeping=True)
        quiet = (last is not None and last.state is ServerState.READY and last.slots_processing == 0
                 and self.props.total_slots is not None
                 and time.monotonic() - self._last_slots_at < self.sleep_idle + self.interval)
        if quiet:
            self._read_at = self._last_slots_at
            return last  # type: ignore[return-value]
        self._last_slots = self.llamacpp.read_slots()
        self._last_slots_at = self._read_at = time.monotonic()
        return self._last_slots

    def build_report(self, reading: SlotsReading, models: tuple[ModelReport, ...] | None = None) -> AgentReport:
        ready = reading.state is ServerState.READY
        return AgentReport(
            external_llamacpp_addr=str(self.external_addr), monitoring_interval=self.interval,
            state=reading.state.value, slots_idle=reading.slots_idle, slots_processing=reading.slots_processing,
            agent_name=self.name, error=reading.error, is_authorized=reading.is_authorized,
            is_slots_endpoint_enabled=reading.is_slots_endpoint_enabled,
            total_slots=reading.slots_idle + reading.slots_processing if ready else None,
            model=self.props.model, llamacpp_build=self.props.build,
            is_sleeping=reading.is_sleeping if ready else None,
            slots_sample_age=round(time.monotonic() - self._read_at, 6) if ready else None,
            models=models if ready else None, router=self.props.router or None,
            models_autoload=self.props.models_autoload if self.props.router else None,
            supervisor=self.supervisor.report() if self.supervisor else None, labels=self.labels,
            drain=self.drain if self.drain.seq else None,
        )

    def _props_stale(self) -> bool:
        """Read /props (and a single server's /v1/models) on every state change, every tick until one read works,
        then once a minute (a router's /models is read every tick: its models load and unload)."""
        return ((self._last_state_changed and self._props_read_at < self._state_changed_at) or self.props == Props()
                or time.monotonic() - self._props_read_at > PROPS_REFRESH_SECONDS)

    def _note_state(self, reading: SlotsReading) -> None:
        self._last_state_changed = reading.state is not self._last_state
        if not self._last_state_changed:
            return
        self._state_changed_at = time.monotonic()
        self._last_state = reading.state
        why_down = self.supervisor.why_down() if self.supervisor is not None else None
        if reading.state is ServerState.READY:
            logger.info("llama.cpp at %s is ready: %s", self.llamacpp.addr,
                        counted(reading.slots_idle + reading.slots_processing, "slot"))
        elif why_down is not None:  # the agent runs it and stopped or is starting it: no advice to check it
            logger.info("llama.cpp at %s is %s while its agent runs it: %s", self.llamacpp.addr, reading.state.value,
                        why_down)
        else:
            logger.warning("llama.cpp at %s is %s: %s (%s)", self.llamacpp.addr, reading.state.value,
                           reading.error, HINTS[reading.state])


def _answer(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _reason(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
