#!/usr/bin/env python3
"""A stand-in ``llama-server`` for llama.cpp's own server test suites (``LLAMA_SERVER_BIN_PATH``).

The suites start a server with a llama-server command line, poll ``/health`` on its port, talk to it,
then stop it with SIGTERM. This program takes that command line and, by ``COMPAT_MODE``:

- ``direct``: runs the real llama-server (``COMPAT_LLAMA_SERVER``) in its place, with the models the
  suites would download replaced by a local one (``COMPAT_MODEL``): the reference run;
- ``balancer``: runs the real llama-server on a hidden loopback port, a paddler-sync agent beside it
  and a paddler-sync balancer on the port the suite asked for, so every request of the test goes
  through the balancer without the test knowing.

Whatever it started dies with it (the suites start the next server on the same port at once, and b4748's
harness stops a server with SIGKILL): in balancer mode it runs the fleet from the first process of a PID
namespace of its own, passing signals on; killed, it has the kernel send that process SIGTERM. That process
kills every process group it started at once, in the signal handler (nothing of a dying fleet may answer
the next test's first /health poll), then reaps them; should it die too, the kernel kills everything in the
namespace. A new balancer waits for its port to be free. Logs go to ``COMPAT_LOG_DIR``, one file per start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWPID = 0x20000000

MODEL_FLAGS = {"-m", "--model", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file", "-mu", "--model-url"}
DRAFT_FLAGS = {"-md", "--model-draft"}


def main(argv: list[str]) -> int:
    real = os.environ["COMPAT_LLAMA_SERVER"]
    args = local_models(argv, os.environ["COMPAT_MODEL"])
    if os.environ.get("COMPAT_MODE", "direct") == "direct":
        os.execv(real, [real, *args])
    if not os.environ.get("COMPAT_INNER"):
        code = in_own_pid_namespace(argv)
        if code is not None:
            return code
    return Fleet(real, args).run()


def in_own_pid_namespace(argv: list[str]) -> int | None:
    """Run this program again as the first process of a new PID namespace and wait for it, passing SIGTERM and
    SIGINT on; if this process is killed, the first process gets SIGTERM (and the kernel kills the namespace's
    processes when that one dies). None where namespaces are not allowed: the fleet then runs here."""
    if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWPID) != 0:
        return None
    pid = os.fork()
    if pid == 0:
        die_with_parent(signal.SIGTERM)
        os.environ["COMPAT_INNER"] = "1"
        os.execv(sys.executable, [sys.executable, __file__, *argv])
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: os.kill(pid, number))
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def local_models(argv: list[str], model: str) -> list[str]:
    """The command line with every model it would fetch (or load) replaced by ``model``, once."""
    out: list[str] = []
    named = False
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in MODEL_FLAGS or arg in DRAFT_FLAGS:
            skip = i + 1 < len(argv)
            if arg in DRAFT_FLAGS:
                out += [arg, model]
            elif not named:
                out += ["-m", model]
                named = True
            continue
        out.append(arg)
    return out


def option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg in names:
            return args[i + 1]
    return None


def replaced(args: list[str], name: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(name) + 1] = value
    return out


def wait_for_free(host: str, port: int, seconds: float = 10.0) -> None:
    """The last test's balancer may take a few milliseconds more to let go of the port."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError:
                time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fleet:
    """llama-server on a hidden port, its agent, and a balancer where the suite expects the server."""

    def __init__(self, real: str, args: list[str]) -> None:
        self.real = real
        self.args = args
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        log_dir = Path(os.environ.get("COMPAT_LOG_DIR", "."))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_dir / f"standin-{time.time_ns()}.log", "ab")  # noqa: SIM115 (as long as the fleet)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        die_with_parent(signal.SIGTERM)  # a suite that dies (or times out) takes the fleet with it
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # gunicorn's workers come back here when their master dies: wait for them
        host = option(self.args, "--host") or "127.0.0.1"
        port = option(self.args, "--port") or "8080"
        hidden, management = free_port(), free_port()
        server_args = replaced(self.args, "--port", str(hidden)) if "--port" in self.args else [
            *self.args, "--port", str(hidden)]
        server_args = replaced(server_args, "--host", "127.0.0.1") if "--host" in server_args else server_args
        server_args = [a for a in server_args if a != "--no-slots"]
        server = self._spawn([self.real, *server_args, *self._agent_needs()])
        agent = [*paddler(), "agent", "--local-llamacpp-addr", f"127.0.0.1:{hidden}",
                 "--management-addr", f"127.0.0.1:{management}", "--monitoring-interval", "0.5",
                 "--name", "standin"]
        key = option(self.args, "--api-key")
        if key:
            agent += ["--llamacpp-api-key", key]
        sleep = option(self.args, "--sleep-idle-seconds")  # the agent must not wake a sleeping server: told, as
        if sleep:                                            # an operator tells it
            agent += ["--llamacpp-sleep-idle-seconds", sleep]
        self._spawn(agent)
        wait_for_free(host, int(port))
        balancer = [*paddler(), "balancer", "--reverseproxy-addr", f"{host}:{port}",
                    "--management-addr", f"127.0.0.1:{management}",
                    *os.environ.get("COMPAT_BALANCER_ARGS", "").split()]
        self._spawn(balancer)
        while not self.stopping:
            for child in self.children:
                code = child.poll()
                if code is not None:
                    self._say(f"{child.args[0]} exited with {code}: stopping the fleet")
                    self._end()
                    return code if child is server else 1
            time.sleep(0.1)
        self._end()
        return 0

    def _agent_needs(self) -> list[str]:
        """The flag an operator adds for the agent: ``/slots``, off by default on b4748 (the balancer refuses
        ``/slots`` to clients unless --slots-endpoint-enable, whatever llama-server allows)."""
        return [] if "--slots" in self.args else ["--slots"]

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        self._say("starting: " + " ".join(argv))
        child = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=lambda: die_with_parent(signal.SIGKILL))
        self.children.append(child)
        return child

    def _stop(self, signum: int, frame: object) -> None:
        """At once, in the handler: the main loop's sleep would resume for its remaining time first (PEP 475)."""
        self.stopping = True
        self._kill_all()

    def _kill_all(self) -> None:
        """Every process group it started, at once: from then on nothing of this fleet answers (the harness's next
        /health poll must not take a dying fleet for its next server)."""
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)

    def _end(self) -> None:
        """Kill them all, then wait for each, and for every orphan that comes back here."""
        self._kill_all()
        for child in self.children:
            child.wait()
        while True:  # every descendant (gunicorn's worker holds the port too) must be gone
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        self._say("stopped")

    def _say(self, text: str) -> None:
        self.log.write(f"standin {time.strftime('%H:%M:%S')}: {text}\n".encode())
        self.log.flush()


def die_with_parent(signum: int) -> None:
    """Linux: be sent ``signum`` when the process that started this one ends."""
    prctl(PR_SET_PDEATHSIG, signum)


def prctl(option: int, value: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def paddler() -> list[str]:
    return os.environ.get("COMPAT_PADDLER", "paddler-sync").split()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
