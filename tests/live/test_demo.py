"""``make demo`` (scripts/demo.py) never says it runs when it does not, and names what went wrong."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers import PYTHON, ROOT, wait_until

DEMO = ROOT / "scripts" / "demo.py"
STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Whatever a test asserts, every process a demo started dies with the test (they are in groups of their own,
    so the demo's group is not enough: its whole tree is killed)."""
    yield
    while STARTED:
        process = STARTED.pop()
        tree = descendants(process.pid)
        for pid in [process.pid, *tree]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(10)


def start_demo(tmp_path: Path, ignore_sigint: bool = False, **ports: str) -> tuple[subprocess.Popen, Path]:
    """The demo in a session of its own, as a shell runs a job (``ignore_sigint``: as ``make demo &`` does)."""
    log = tmp_path / "demo.log"
    env = {**os.environ, "PROXY_PORT": "auto", "MANAGEMENT_PORT": "auto", "SIMULATOR_PORTS": "auto", **ports}
    with log.open("wb") as out:
        process = subprocess.Popen([PYTHON, str(DEMO)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True,
                                   preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
                                   if ignore_sigint else None)
    STARTED.append(process)
    return process, log


def descendants(pid: int) -> list[int]:
    found = children_of(pid)
    return [*found, *(grandchild for child in found for grandchild in descendants(child))]


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


def test_every_taken_port_is_named_at_once_with_one_command_line_that_works(tmp_path: Path) -> None:
    with socket.socket() as proxy_squatter, socket.socket() as simulator_squatter:
        for squatter in (proxy_squatter, simulator_squatter):
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
        proxy, simulator = proxy_squatter.getsockname()[1], simulator_squatter.getsockname()[1]
        process, log = start_demo(tmp_path, PROXY_PORT=str(proxy), SIMULATOR_PORTS=f"{simulator},auto")
        assert process.wait(20) == 1
        text = log.read_text()
        assert f"port {proxy}, for the reverse proxy; port {simulator}, for simulated llama.cpp 'llama-small'" in text
        assert "demo is running" not in text
        advice = re.search(r"make demo (.+)$", text, re.M)
        assert advice and advice.group(1) == "PROXY_PORT=auto MANAGEMENT_PORT=auto SIMULATOR_PORTS=auto", text
        words = dict(word.split("=") for word in advice.group(1).split())
        process, log = start_demo(tmp_path, **words)  # what it says to run runs, the squatters still there
        wait_until(lambda: "demo is running" in log.read_text(), timeout=30)
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0


def test_bad_port_settings_are_named(tmp_path: Path) -> None:
    process, log = start_demo(tmp_path, PROXY_PORT="eighty")
    assert process.wait(20) == 1
    assert "PROXY_PORT='eighty' is not a port number" in log.read_text()


def test_runs_serves_and_stops_with_an_error_when_a_process_dies(tmp_path: Path) -> None:
    process, log = start_demo(tmp_path)
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
    assert process.wait(30) == 1
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


def test_ctrl_c_stops_everything_and_exits_0_even_where_the_shell_ignores_sigint(tmp_path: Path) -> None:
    process, log = start_demo(tmp_path, ignore_sigint=True)  # `make demo &`: started with SIGINT ignored
    wait_until(lambda: "demo is running" in log.read_text(), timeout=30)
    children = children_of(process.pid)
    assert len(children) == 6  # a balancer, two simulators, three agents
    supervised = wait_until(lambda: [pid for agent in children for pid in children_of(agent)
                                     if is_simulator(pid)], message="the server an agent runs")
    assert len(supervised) == 1
    children += supervised
    process.send_signal(signal.SIGINT)
    assert process.wait(20) == 0
    assert all(gone(pid) for pid in children)


def test_ctrl_c_in_a_terminal_lets_a_running_stream_finish(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the demo's whole foreground group: the servers must not die under the stream."""
    process, log = start_demo(tmp_path)
    running = wait_until(lambda: re.search(r"reverse proxy +http://127\.0\.0\.1:(\d+)", log.read_text()),
                         timeout=30)
    lines: list[bytes] = []
    started = threading.Event()

    def stream() -> None:
        with requests.post(f"http://127.0.0.1:{running.group(1)}/v1/chat/completions", stream=True, timeout=30,
                           json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40,
                                 "stream": True}) as answer:
            for line in answer.iter_lines():
                started.set()
                if line:
                    lines.append(line)

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(20)
    os.killpg(process.pid, signal.SIGINT)  # what the terminal does
    reader.join(30)
    assert lines[-1] == b"data: [DONE]" and not any(line.startswith(b"error:") for line in lines)
    assert process.wait(40) == 0
    assert "Ctrl-C again: kill at once" in log.read_text()
