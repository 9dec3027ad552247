"""``make demo`` (scripts/demo.py) never says it runs when it does not, and names what went wrong."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import requests

from tests.helpers import PYTHON, ROOT, wait_until

DEMO = ROOT / "scripts" / "demo.py"


def start_demo(tmp_path: Path, **ports: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "demo.log"
    env = {**os.environ, "PROXY_PORT": "auto", "MANAGEMENT_PORT": "auto", "SIMULATOR_PORTS": "auto,auto", **ports}
    with log.open("wb") as out:
        process = subprocess.Popen([PYTHON, str(DEMO)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return process, log


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def is_simulator(pid: int) -> bool:
    """``paddler_sync simulate``, run by the demo or by an agent (not the agent whose --supervise names it)."""
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"simulate" in words and b"agent" not in words


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_port_taken_by_another_program_is_named_with_its_setting(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        process, log = start_demo(tmp_path, SIMULATOR_PORTS=f"{taken},auto")
        assert process.wait(20) == 1
    text = log.read_text()
    assert f"port {taken}, for simulated llama.cpp 'llama-small', is taken by another program" in text
    assert "SIMULATOR_PORTS=auto" in text and "demo is running" not in text


def test_bad_port_settings_are_named(tmp_path: Path) -> None:
    process, log = start_demo(tmp_path, PROXY_PORT="eighty")
    assert process.wait(20) == 1
    assert "PROXY_PORT='eighty' is not a port number" in log.read_text()


def test_runs_serves_and_stops_with_an_error_when_a_process_dies(tmp_path: Path) -> None:
    process, log = start_demo(tmp_path)
    try:
        running = wait_until(lambda: re.search(r"reverse proxy +http://127\.0\.0\.1:(\d+)", log.read_text()),
                             timeout=30)
        proxy = f"http://127.0.0.1:{running.group(1)}"
        answer = requests.post(proxy + "/v1/chat/completions", timeout=20,
                               json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
        swap_the_supervised_servers_model(log.read_text())
        children = children_of(process.pid)
        simulators = [pid for pid in children if is_simulator(pid)]
        assert len(simulators) == 2
        os.kill(simulators[0], signal.SIGKILL)
        assert process.wait(20) == 1
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert re.search(r"simulated llama.cpp 'llama-\w+' exited with code -9: its log above says why; "
                     r"stopping the others", text)
    assert all(gone(pid) for pid in children)


def swap_the_supervised_servers_model(banner: str) -> None:
    """What the banner says to run does what it says: the supervised server's model is swapped."""
    found = re.search(r"curl -X PUT (http://\S+/api/v1/desired_state) .*\n\s+-d '(.+)'", banner)
    assert found, banner
    url, body = found.group(1), json.loads(found.group(2))
    management = url.removesuffix("/api/v1/desired_state")
    wait_until(lambda: any(a["agent_name"] == "llama-swap" and a["state"] == "ready"
                           for a in requests.get(management + "/api/v1/agents", timeout=5).json()["agents"]),
               timeout=30, message="the supervised server ready")
    assert requests.put(url, json=body, timeout=5).status_code == 202
    wait_until(lambda: requests.get(url, timeout=5).json()["counts"] == {"applied": 1}, timeout=30,
               message="the swap applied")


def test_ctrl_c_stops_everything_and_exits_0(tmp_path: Path) -> None:
    process, log = start_demo(tmp_path)
    try:
        wait_until(lambda: "demo is running" in log.read_text(), timeout=30)
        children = children_of(process.pid)
        assert len(children) == 6  # a balancer, two simulators, three agents
        supervised = wait_until(lambda: [pid for agent in children for pid in children_of(agent)
                                         if is_simulator(pid)], message="the server an agent runs")
        assert len(supervised) == 1
        children += supervised
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert all(gone(pid) for pid in children)
