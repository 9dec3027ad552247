"""``make demo``: a balancer, two simulated llama.cpp servers (2 and 4 slots) and one agent each.

Every process is a real ``paddler-sync`` command, as an operator would run it; Ctrl-C stops them all.
Ports: PROXY_PORT (8080), MANAGEMENT_PORT (8085), and the simulators on 8081 and 8082.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

PROXY = int(os.environ.get("PROXY_PORT", "8080"))
MANAGEMENT = int(os.environ.get("MANAGEMENT_PORT", "8085"))
SERVERS = [("llama-small", 8081, 2), ("llama-large", 8082, 4)]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "paddler_sync", *args]


def wait_for_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s: see the logs above")


def main() -> None:
    processes: list[subprocess.Popen] = []

    def start(*args: str) -> None:
        processes.append(subprocess.Popen(command(*args)))

    start("balancer", "--reverseproxy-addr", f"127.0.0.1:{PROXY}", "--management-addr", f"127.0.0.1:{MANAGEMENT}",
          "--management-dashboard-enable")
    for _name, port, slots in SERVERS:
        start("simulate", "--addr", f"127.0.0.1:{port}", "--parallel", str(slots), "--decode-tokens-per-second", "25")
    wait_for_port(MANAGEMENT)
    for name, port, _ in SERVERS:
        wait_for_port(port)
        start("agent", "--local-llamacpp-addr", f"127.0.0.1:{port}", "--management-addr",
              f"127.0.0.1:{MANAGEMENT}", "--name", name)
    wait_for_port(PROXY)
    print(f"""
paddler_sync demo is running (Ctrl-C stops it):
  reverse proxy      http://127.0.0.1:{PROXY}
  management API     http://127.0.0.1:{MANAGEMENT}/api/v1/agents   and /health
  web dashboard      http://127.0.0.1:{MANAGEMENT}/dashboard
  terminal dashboard .venv/bin/paddler-sync dashboard --management-addr 127.0.0.1:{MANAGEMENT}
  llama.cpp (simulated) {', '.join(f'{n} :{p} ({s} slots)' for n, p, s in SERVERS)}

Try:
  curl -N http://127.0.0.1:{PROXY}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"messages":[{{"role":"user","content":"Hello"}}],"max_tokens":50,"stream":true}}'
""", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        print("a demo process exited; stopping the others", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
