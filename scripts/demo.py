"""``make demo``: a balancer, two simulated llama.cpp servers (2 and 4 slots) and one agent each, and a third
server that its agent runs itself (``--supervise``), whose model the banner shows how to swap.

Every process is a real ``paddler-sync`` command, as an operator would run it. Ctrl-C (SIGINT, even where the
shell started the demo with SIGINT ignored, as a background job) or SIGTERM stops them in order, as an operator
would: the balancer and the agents first (a stream that runs finishes), then the servers. The processes run
in a process group of their own, so a terminal's Ctrl-C reaches the demo alone, and die with it.
Ports come from the environment (``make demo PROXY_PORT=9080`` works too); ``auto`` picks a free one:

    PROXY_PORT        8080        the reverse proxy (clients send requests here)
    MANAGEMENT_PORT   8085        the management API, the web dashboard, and where agents report
    SIMULATOR_PORTS   8081,8082   the two simulated llama.cpp servers (auto: both free ones)

The demo never trusts a listener it did not start: the ports taken before it starts are named, all at once,
with one command line that moves them, and the demo exits 1; a demo process that dies is named, with its
exit code, and the demo stops the others and exits 1.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 40.0  # the balancer lets streams run for its --graceful-timeout (30 s) when it stops
PR_SET_PDEATHSIG = 1
SERVERS = (("llama-small", 2), ("llama-large", 4))
SUPERVISED = "llama-swap"  # its agent picks its port, runs it, and swaps its model when asked
MODELS = ("chat-small.gguf", "chat-large.gguf")  # empty files: the simulator only checks that its model exists


class DemoFailed(Exception):
    """Something the operator must fix; the message says what, and how."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    port: int | None = None
    server: bool = False  # a llama.cpp server: stopped after the balancer and agents that send it requests


@dataclass
class Ports:
    proxy: int
    management: int
    simulators: list[int] = field(default_factory=list)

    def named(self) -> list[tuple[str, str, int]]:
        """(what listens, the variable that moves it, port) for every port the demo needs."""
        return [("the reverse proxy", "PROXY_PORT", self.proxy),
                ("the management server", "MANAGEMENT_PORT", self.management),
                *((f"simulated llama.cpp '{name}'", "SIMULATOR_PORTS", port)
                  for (name, _), port in zip(SERVERS, self.simulators, strict=True))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_setting(variable: str, default: str, count: int = 1) -> list[int]:
    text = os.environ.get(variable, default)
    if text.strip() == "auto":
        text = ",".join(["auto"] * count)
    try:
        ports = [free_port() if part.strip() == "auto" else int(part) for part in text.split(",")]
    except ValueError:
        raise DemoFailed(f"{variable}={text!r} is not a port number: use e.g. {variable}={default}, "
                         f"or {variable}=auto for a free one") from None
    if not all(0 < port < 65536 for port in ports):
        raise DemoFailed(f"{variable}={text!r}: ports are 1-65535")
    return ports


def ports_from_environment() -> Ports:
    simulators = port_setting("SIMULATOR_PORTS", "8081,8082", len(SERVERS))
    if len(simulators) != len(SERVERS):
        raise DemoFailed(f"SIMULATOR_PORTS needs {len(SERVERS)} ports, comma-separated (e.g. 8081,8082), "
                         f"or 'auto,auto'")
    ports = Ports(port_setting("PROXY_PORT", "8080")[0], port_setting("MANAGEMENT_PORT", "8085")[0], simulators)
    numbers = [port for _, _, port in ports.named()]
    if len(set(numbers)) != len(numbers):
        raise DemoFailed(f"the demo needs {len(numbers)} different ports, got {numbers}")
    return ports


def check_ports_are_free(ports: Ports) -> None:
    """Every taken port at once, with one command line that moves them all and keeps the user's other choices."""
    taken = [(what, variable, port) for what, variable, port in ports.named() if not bindable(port)]
    if not taken:
        return
    moved = {variable for _, variable, _ in taken}
    words = [f"{v}=auto" if v in moved else f"{v}={os.environ[v]}" for v in PORT_VARIABLES
             if v in moved or v in os.environ]
    named = "; ".join(f"port {port}, for {what}" for what, _, port in taken)
    raise DemoFailed(f"{named}: taken by another program. Stop it, or move the demo: make demo {' '.join(words)}")


PORT_VARIABLES = ("PROXY_PORT", "MANAGEMENT_PORT", "SIMULATOR_PORTS")


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def die_with_demo() -> None:
    """In each child: a group of its own (a terminal's Ctrl-C is the demo's to handle, in order), and SIGTERM
    when the demo dies, however it dies."""
    os.setpgid(0, 0)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "paddler_sync", *args]


class Demo:
    def __init__(self, ports: Ports) -> None:
        self.ports = ports
        self.children: list[Child] = []
        self.models = tempfile.mkdtemp(prefix="paddler-demo-models-")
        for model in MODELS:
            open(os.path.join(self.models, model), "w").close()

    def start(self, name: str, *args: str, port: int | None = None, server: bool = False) -> None:
        process = subprocess.Popen(command(*args), preexec_fn=die_with_demo)
        self.children.append(Child(name, process, port, server))

    def wait_until_listening(self, child: Child) -> None:
        """Our child, not some other program, must be the one listening; a child that dies is named."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.check_children()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", child.port)) == 0:
                    return
            time.sleep(0.1)
        raise DemoFailed(f"{child.name} does not listen on port {child.port} after {READY_TIMEOUT:g}s: see its "
                         f"log above")

    def check_children(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise DemoFailed(f"{child.name} exited with code {code}: its log above says why")

    def run(self) -> None:
        ports = self.ports
        self.start("the balancer", "balancer", "--reverseproxy-addr", f"127.0.0.1:{ports.proxy}",
                   "--management-addr", f"127.0.0.1:{ports.management}", "--management-dashboard-enable",
                   port=ports.management)
        for (name, slots), port in zip(SERVERS, ports.simulators, strict=True):
            self.start(f"simulated llama.cpp '{name}'", "simulate", "--addr", f"127.0.0.1:{port}",
                       "--parallel", str(slots), "--decode-tokens-per-second", "25", port=port, server=True)
        for child in list(self.children):
            self.wait_until_listening(child)
        for (name, _), port in zip(SERVERS, ports.simulators, strict=True):
            self.start(f"the agent of '{name}'", "agent", "--local-llamacpp-addr", f"127.0.0.1:{port}",
                       "--management-addr", f"127.0.0.1:{ports.management}", "--name", name)
        self.start(f"the agent of '{SUPERVISED}'", "agent", "--management-addr", f"127.0.0.1:{ports.management}",
                   "--name", SUPERVISED, "--supervise", "--", *command("simulate"), "-m",
                   os.path.join(self.models, MODELS[0]), "-np", "2", "--decode-tokens-per-second", "25",
                   "--startup-time", "2")
        self.wait_until_listening(Child("the balancer's proxy", self.children[0].process, ports.proxy))
        print(banner(ports, os.path.join(self.models, MODELS[1])), flush=True)
        while True:
            self.check_children()
            time.sleep(0.5)

    def kill(self) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.kill()

    def stop(self) -> None:
        """The balancer and agents first (requests in flight finish; an agent stops the server it runs), then
        the servers they sent requests to."""
        stop_all([c for c in self.children if not c.server])
        stop_all([c for c in self.children if c.server])
        shutil.rmtree(self.models, ignore_errors=True)


def stop_all(children: list[Child]) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"paddler_sync demo: {child.name} did not stop within {STOP_TIMEOUT:g}s: killed", file=sys.stderr)
            child.process.kill()
            child.process.wait()


def banner(ports: Ports, other_model: str) -> str:
    servers = ", ".join(f"{name} :{port} ({slots} slots)" for (name, slots), port in zip(SERVERS, ports.simulators,
                                                                                       strict=True))
    return f"""
paddler_sync demo is running (Ctrl-C stops it):
  reverse proxy      http://127.0.0.1:{ports.proxy}
  management API     http://127.0.0.1:{ports.management}/api/v1/agents   and /health
  web dashboard      http://127.0.0.1:{ports.management}/dashboard
  terminal dashboard .venv/bin/paddler-sync dashboard --management-addr 127.0.0.1:{ports.management}
  llama.cpp (simulated) {servers}, and {SUPERVISED} (run by its agent)

Try:
  curl -N http://127.0.0.1:{ports.proxy}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"messages":[{{"role":"user","content":"Hello"}}],"max_tokens":50,"stream":true}}'
Swap {SUPERVISED}'s model (it drains, restarts, loads for 2 s, and serves again; nothing fails):
  curl -X PUT http://127.0.0.1:{ports.management}/api/v1/desired_state -H 'Content-Type: application/json' \\
    -d '{{"model":"{other_model}"}}'
  or press "Change model" on its row in the web dashboard.
"""


def interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)  # explicitly: a shell may have started the demo with SIGINT ignored
    demo: Demo | None = None
    try:
        ports = ports_from_environment()
        check_ports_are_free(ports)
        demo = Demo(ports)
        demo.run()
    except DemoFailed as exc:
        started = demo is not None and demo.children
        print(f"paddler_sync demo: {exc}{'; stopping the others' if started else ''}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\npaddler_sync demo: stopping; requests in flight finish first (Ctrl-C again: kill at once)",
              file=sys.stderr, flush=True)
        return 0
    finally:
        if demo is not None:
            hurry = demo.kill
            signal.signal(signal.SIGINT, lambda *_: hurry())
            signal.signal(signal.SIGTERM, lambda *_: hurry())
            demo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
