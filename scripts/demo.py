"""``make demo``: a balancer, two simulated llama.cpp servers (2 and 4 slots) and one agent each, and a third
server that its agent runs itself (``--supervise``), whose model the banner shows how to swap.

Every process is a real ``paddler-sync`` command, as an operator would run it; Ctrl-C stops them all.
Ports come from the environment (``make demo PROXY_PORT=9080`` works too); ``auto`` picks a free one:

    PROXY_PORT        8080        the reverse proxy (clients send requests here)
    MANAGEMENT_PORT   8085        the management API, the web dashboard, and where agents report
    SIMULATOR_PORTS   8081,8082   the two simulated llama.cpp servers

The demo never trusts a listener it did not start: a port taken before it starts is named (with the
variable that moves it) and the demo exits 1; a demo process that dies is named, with its exit code,
and the demo stops the others and exits 1.
"""

from __future__ import annotations

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


def port_setting(variable: str, default: str) -> list[int]:
    text = os.environ.get(variable, default)
    try:
        ports = [free_port() if part.strip() == "auto" else int(part) for part in text.split(",")]
    except ValueError:
        raise DemoFailed(f"{variable}={text!r} is not a port number: use e.g. {variable}={default}, "
                         f"or {variable}=auto for a free one") from None
    if not all(0 < port < 65536 for port in ports):
        raise DemoFailed(f"{variable}={text!r}: ports are 1-65535")
    return ports


def ports_from_environment() -> Ports:
    simulators = port_setting("SIMULATOR_PORTS", "8081,8082")
    if len(simulators) != len(SERVERS):
        raise DemoFailed(f"SIMULATOR_PORTS needs {len(SERVERS)} ports, comma-separated (e.g. 8081,8082), "
                         f"or 'auto,auto'")
    ports = Ports(port_setting("PROXY_PORT", "8080")[0], port_setting("MANAGEMENT_PORT", "8085")[0], simulators)
    numbers = [port for _, _, port in ports.named()]
    if len(set(numbers)) != len(numbers):
        raise DemoFailed(f"the demo needs {len(numbers)} different ports, got {numbers}")
    return ports


def check_ports_are_free(ports: Ports) -> None:
    for what, variable, port in ports.named():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                raise DemoFailed(f"port {port}, for {what}, is taken by another program ({exc.strerror}): stop "
                                 f"it, or move the demo: make demo {variable}=auto") from None


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "paddler_sync", *args]


class Demo:
    def __init__(self, ports: Ports) -> None:
        self.ports = ports
        self.children: list[Child] = []
        self.models = tempfile.mkdtemp(prefix="paddler-demo-models-")
        for model in MODELS:
            open(os.path.join(self.models, model), "w").close()

    def start(self, name: str, *args: str, port: int | None = None) -> None:
        self.children.append(Child(name, subprocess.Popen(command(*args)), port))

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
                       "--parallel", str(slots), "--decode-tokens-per-second", "25", port=port)
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

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.process.wait(10)
            except subprocess.TimeoutExpired:
                child.process.kill()
        shutil.rmtree(self.models, ignore_errors=True)


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


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
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
        return 0
    finally:
        if demo is not None:
            demo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
