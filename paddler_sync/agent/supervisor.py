"""The supervisor: the agent runs llama-server as its child, keeps it running and applies desired states.

It is driven by the agent's tick (paddler_sync/agent/monitor.py): each interval :meth:`Supervisor.step`
learns what llama.cpp answered, and :meth:`Supervisor.follow` what the balancer wants. Nothing here
blocks, so reports keep flowing while llama-server stops, starts and loads; the balancer sees every
state as it happens.

A desired state is applied in phases: *draining* (the balancer sends no new requests; the ones running
finish, up to the state's drain timeout), *stopping* (SIGTERM, then SIGKILL), *starting* (the new command,
until its slots are seen). If the new command exits or is not ready in time, the agent goes back to the
last command that worked (*rolling_back*) and reports the failure; the balancer then undrains the server.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gevent import subprocess as gsubprocess
from gevent.pool import Group

from paddler_sync.agent.launch import CommandLine
from paddler_sync.llamacpp import SlotsReading
from paddler_sync.logs import log_greenlet_exception
from paddler_sync.protocol.states import ServerState
from paddler_sync.protocol.supervision import (
    BACKING_OFF,
    CRASHED,
    LOADING,
    READY,
    RESTARTING,
    STARTING,
    STATE_HINTS,
    STOPPING,
    Control,
    DesiredState,
    SupervisorReport,
)
from paddler_sync.words import counted

logger = logging.getLogger("paddler_sync.supervisor")
output_logger = logging.getLogger("paddler_sync.llama_server")
PR_SET_PDEATHSIG = 1
STABLE_SECONDS = 10.0  # ready this long, and earlier failures no longer count towards the limit
TAIL_LINES = 20


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


LIBC = _load_libc()  # loaded before any fork: the child may not load libraries between fork and exec


def die_with_parent(parent: int) -> Callable[[], None]:
    """Run in the child between fork and exec: the kernel kills it when the agent dies, even by SIGKILL."""
    def arrange() -> None:
        if LIBC is not None and hasattr(LIBC, "prctl"):
            LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the agent died before the line above ran
            os._exit(1)

    return arrange


class Child:
    """One llama-server process in its own session (a terminal's Ctrl-C reaches the agent, which drains first;
    stopping it signals its whole group), its output logged line by line."""

    def __init__(self, argv: Sequence[str], log_level: int, group: Group) -> None:
        self.argv = list(argv)
        self.popen = gsubprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=die_with_parent(os.getpid()))
        self.pid = self.popen.pid
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.log_level = log_level
        pump = group.spawn(self._pump)
        pump.name = f"llama-server-output-{self.pid}"
        pump.link_exception(log_greenlet_exception(logger))

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.tail.append(line)
                output_logger.log(self.log_level, "[llama-server %d] %s", self.pid, line)

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def last_words(self) -> str | None:
        """Its last line of output that looks like an error, for the reports."""
        errors = [line for line in self.tail if "error" in line.lower() or "failed" in line.lower()]
        return errors[-1][-500:] if errors else None

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; blocks (the agent's own shutdown only)."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except gsubprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self.popen.wait(5)


def exit_words(code: int, last_words: str | None) -> str:
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
        else f"exited with code {code}"
    return f"{how}: {last_words}" if last_words else how


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 10  # failed starts in a row before giving up; 0: never
    backoff: float = 1.0
    backoff_max: float = 60.0
    start_timeout: float = 300.0
    unresponsive_timeout: float = 30.0
    stop_timeout: float = 10.0

    def delay(self, failures: int) -> float:
        """The first restart at once (a crash after a good run is usually a one-off), then growing pauses."""
        return 0.0 if failures <= 1 else min(self.backoff_max, self.backoff * 2 ** (failures - 2))

    def gives_up(self, failures: int) -> bool:
        return self.max_restarts > 0 and failures > self.max_restarts


class Supervisor:
    def __init__(self, command: CommandLine, policy: RestartPolicy, log_level: int = logging.INFO,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.command = command
        self.policy = policy
        self.log_level = log_level
        self.clock = clock
        self.group = Group()
        self.child: Child | None = None
        self.state = STARTING
        self.note = ""  # what the state's hint adds (why it crashed, what it waits for)
        self.failures = 0  # failed starts in a row
        self.restarts = 0
        self.applied: DesiredState | None = None  # running now (None: the command as given)
        self.working_on: DesiredState | None = None
        self.phase: str | None = None
        self.failed_id: str | None = None
        self.failed_error: str | None = None
        self.started_at = 0.0
        self.phase_since = 0.0
        self.ready_since: float | None = None
        self.down_since: float | None = None
        self.unanswered_since: float | None = None
        self.recovered_in: float | None = None
        self.restart_at: float | None = None
        self.kill_at: float | None = None  # SIGKILL a child that ignores SIGTERM this long
        self.killed_because: str | None = None
        self.in_flight = 0  # the balancer's requests still running on the server, from its last answer

    # --- starting and stopping ------------------------------------------------------------------------------

    def start(self) -> None:
        now = self.clock()
        if not self._launch(self.command.argv(), now):
            self._failed(now, self.note)

    def argv_for(self, desired: DesiredState | None) -> list[str]:
        if desired is None:
            return self.command.argv()
        return self.command.argv(desired.model, desired.args)

    def _launch(self, argv: list[str], now: float) -> bool:
        """Start the command; False (and ``note`` says why) when it cannot even be started."""
        try:
            self.child = Child(argv, self.log_level, self.group)
        except OSError as exc:
            self.child = None
            self.note = f"cannot start `{argv[0]}`: {exc.strerror or exc}"
            logger.error("%s", self.note)
            return False
        logger.info("started llama-server (pid %d): %s", self.child.pid, " ".join(argv))
        self.state, self.note = STARTING, ""
        self.started_at, self.ready_since, self.unanswered_since = now, None, None
        self.restart_at = self.kill_at = None
        self.killed_because = None
        return True

    def _begin_stop(self, now: float, why: str) -> None:
        """SIGTERM now; SIGKILL if it is still there after --supervise-stop-timeout (checked each step)."""
        if self.child is None:
            return
        logger.info("stopping llama-server (pid %d): %s", self.child.pid, why)
        self.child.signal(signal.SIGTERM)
        self.kill_at = now + self.policy.stop_timeout
        self.state = RESTARTING

    def _kill(self, now: float, why: str) -> None:
        if self.child is not None:
            logger.warning("killing llama-server (pid %d): %s", self.child.pid, why)
            self.killed_because = why
            self.child.signal(signal.SIGKILL)

    def shutdown(self) -> None:
        """The agent stops: llama-server stops with it (blocking, up to --supervise-stop-timeout)."""
        self.state, self.note = STOPPING, ""
        if self.child is not None:
            code = self.child.stop(self.policy.stop_timeout)
            logger.info("llama-server (pid %d) stopped (exit code %s)", self.child.pid, code)
            self.child = None
        self.group.kill(block=True, timeout=2)

    # --- each tick ---------------------------------------------------------------------------------------------

    def step(self, reading: SlotsReading, now: float | None = None) -> None:
        """What llama.cpp answered this tick, and the next move: note exits, readiness, timeouts, phases."""
        now = self.clock() if now is None else now
        if self.state == STOPPING:
            return
        if self.child is not None:
            code = self.child.exit_code()
            if code is not None:
                self._exited(code, now)
            elif self.kill_at is not None and now >= self.kill_at:
                self._kill(now, f"it did not exit within {self.policy.stop_timeout:g}s of SIGTERM")
                self.kill_at = None
            elif self.kill_at is None:
                self._watch(reading, now)
        if self.child is None and self.restart_at is not None:
            if now >= self.restart_at:
                self.restarts += 1
                self.state = RESTARTING
                if not self._launch(self.argv_for(self.applied), now):
                    self._failed(now, self.note)
            else:
                self.state = BACKING_OFF
        if self.phase == "draining" and self._drained(reading, now):
            assert self.working_on is not None
            self.phase, self.phase_since = "stopping", now
            self._begin_stop(now, f"to apply desired state {self.working_on.id} ({self.working_on.describe()})")

    def _watch(self, reading: SlotsReading, now: float) -> None:
        """A live child: starting, loading, ready; one that stops answering, or never gets ready, is killed."""
        if reading.state is ServerState.READY:
            self.unanswered_since = None
            if self.state != READY:
                self._became_ready(now)
            elif self.ready_since is not None and now - self.ready_since >= STABLE_SECONDS:
                self.failures = 0
            return
        if self.state == READY:
            if reading.state is ServerState.UNREACHABLE:
                self.unanswered_since = self.unanswered_since or now
                if now - self.unanswered_since >= self.policy.unresponsive_timeout:
                    self._kill(now, f"it has not answered for {now - self.unanswered_since:.0f}s")
            return
        self.state = LOADING if reading.state is ServerState.LOADING else STARTING
        if now - self.started_at >= self.policy.start_timeout:
            self._kill(now, f"it was not ready within {self.policy.start_timeout:g}s (--supervise-start-timeout)")

    def _became_ready(self, now: float) -> None:
        self.state, self.note, self.ready_since = READY, "", now
        if self.down_since is not None:
            self.recovered_in = round(now - self.down_since, 3)
            logger.info("llama-server is ready again, %.1fs after it went down", self.recovered_in)
            self.down_since = None
        if self.phase == "starting" and self.working_on is not None:
            logger.info("desired state %s applied in %.1fs: %s", self.working_on.id, now - self.phase_since,
                        self.working_on.describe())
            self.applied = self.working_on
        elif self.phase == "rolling_back":
            logger.warning("rolled back to %s after desired state %s failed", self._applied_text(), self.failed_id)
        else:
            logger.info("llama-server (pid %d) is ready", self.child.pid if self.child else 0)
        self.working_on, self.phase = None, None

    def _exited(self, code: int, now: float) -> None:
        child, self.child = self.child, None
        assert child is not None
        words = self.killed_because or exit_words(code, child.last_words())
        if self.phase in ("draining", "stopping") and self.working_on is not None:  # start the desired command
            self.phase, self.phase_since = "starting", now
            if not self._launch(self.argv_for(self.working_on), now):
                self._roll_back(now, self.note)
            return
        self.down_since = self.down_since or now
        logger.warning("llama-server (pid %d) %s", child.pid, words)
        if self.phase == "starting" and self.working_on is not None:
            self._roll_back(now, words)
            return
        if self.phase == "rolling_back":  # the command that worked before fails too: restart it with backoff
            self.working_on, self.phase = None, None
        self._failed(now, words)

    def _roll_back(self, now: float, why: str) -> None:
        assert self.working_on is not None
        self.failed_id, self.failed_error = self.working_on.id, why[:2000]
        logger.error("desired state %s failed (%s): %s; going back to %s", self.working_on.id,
                     self.working_on.describe(), why, self._applied_text())
        self.phase, self.phase_since = "rolling_back", now
        self.restarts += 1
        if not self._launch(self.argv_for(self.applied), now):
            self.working_on, self.phase = None, None
            self._failed(now, self.note)

    def _failed(self, now: float, why: str) -> None:
        """A crash or a failed start: restart after a growing pause, until the limit."""
        self.failures += 1
        self.state, self.note = CRASHED, why
        if self.policy.gives_up(self.failures):
            self.restart_at = None
            self.note = (f"gave up after {self.failures} failed starts in a row (--supervise-max-restarts): {why}. "
                         "Fix the command and set a desired state, or restart the agent")
            logger.error("llama-server: %s", self.note)
            return
        delay = self.policy.delay(self.failures)
        self.restart_at = now + delay
        logger.info("restarting llama-server in %.1fs (failure %d in a row)", delay, self.failures)

    def _drained(self, reading: SlotsReading, now: float) -> bool:
        """Nothing of the balancer's runs there any more, and llama.cpp's slots are idle, or time is up."""
        assert self.working_on is not None
        waited = now - self.phase_since
        if waited >= self.working_on.drain_timeout:
            if self.in_flight:
                logger.warning("drain timeout (%gs): %s in flight are cut", self.working_on.drain_timeout,
                               counted(self.in_flight, "request"))
            return True
        idle = reading.state is not ServerState.READY or reading.slots_processing == 0
        return waited > 0 and self.in_flight == 0 and idle

    # --- what the balancer wants ---------------------------------------------------------------------------------

    def follow(self, control: Control | None, now: float | None = None) -> None:
        """The balancer's answer to the last report: requests still in flight, a desired state to apply."""
        if control is None or self.state == STOPPING:
            return
        now = self.clock() if now is None else now
        self.in_flight = control.in_flight
        target = control.apply
        if target is None or self._known(target):
            return
        if self.working_on is not None and self.phase != "draining":
            return  # one change at a time: the balancer asks again once this one is done
        self.working_on, self.failures, self.restart_at = target, 0, None
        if self.child is None:  # down (crashed, gave up): nothing to drain or stop
            self.phase, self.phase_since = "starting", now
            if not self._launch(self.argv_for(target), now):
                self._roll_back(now, self.note)
            return
        self.phase, self.phase_since = "draining", now
        logger.info("applying desired state %s (%s): draining first (%s in flight, up to %gs)",
                    target.id, target.describe(), counted(control.in_flight, "request"), target.drain_timeout)

    def _known(self, target: DesiredState) -> bool:
        return target.id in (self.applied.id if self.applied else None, self.failed_id) or (
            self.working_on is not None and self.working_on.id == target.id)

    def _applied_text(self) -> str:
        return f"desired state {self.applied.id}" if self.applied else "the command the agent was started with"

    def why_down(self) -> str | None:
        """Why llama-server does not answer when this agent made it so (a start, a restart, a swap's stop), in
        words for the log; None when it should be answering."""
        if self.state == READY and self.phase is None:
            return None
        doing = STATE_HINTS[self.state]
        if self.phase is not None and self.working_on is not None:
            doing += f"; applying desired state {self.working_on.id}: {self.phase.replace('_', ' ')}"
        return doing

    # --- what the report says ---------------------------------------------------------------------------------

    def report(self) -> SupervisorReport:
        hint = STATE_HINTS[self.state] + (f": {self.note}" if self.note else "")
        if self.phase is not None and self.working_on is not None:
            hint += f"; applying desired state {self.working_on.id}: {self.phase.replace('_', ' ')}"
        return SupervisorReport(
            self.state, hint[:2000], self.child.pid if self.child else None, self.restarts,
            tuple(self.child.argv if self.child else self.argv_for(self.applied)), self.applied, self.working_on,
            self.phase, self.failed_id, self.failed_error, self.recovered_in)

