"""Installed as a user would: the wheel in a fresh virtual environment, without the test extras.

The test extras bring packages (packaging, for one) that the run-time code may import without declaring
them; only a clean install shows it. Both documented ways to run the balancer start from that install and
stream one request end to end. The package is imported from the venv, never from this checkout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.helpers import ROOT, Fleet, free_port, port_open, wait_until

pytestmark = pytest.mark.timeout(600)
BUILD_OUTPUT: list[str] = []  # pip's output while building the wheel (the fixture builds it once)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv with the built wheel and its declared dependencies only."""
    scratch = tmp_path_factory.mktemp("install")
    wheels = scratch / "wheels"
    BUILD_OUTPUT.append(run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(ROOT)]))
    run([sys.executable, "-m", "venv", str(scratch / "venv")])
    bin_dir = scratch / "venv" / "bin"
    wheel = next(wheels.glob("paddler_sync-*.whl"))
    run([str(bin_dir / "pip"), "install", "--quiet", str(wheel)])
    return bin_dir


def run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_the_wheel_builds_without_warnings_and_carries_its_data_files(installed: Path) -> None:
    assert "Warning" not in BUILD_OUTPUT[0], BUILD_OUTPUT[0]
    probe = subprocess.run([str(installed / "python"), "-c", "import importlib.resources as r; print(sorted(p.name "
                            "for p in r.files('paddler_sync.management.templates').iterdir()), "
                            "sorted(p.name for p in (r.files('paddler_sync.ledger.stores.redis') / 'lua').iterdir()), "
                            "sorted(p.name for p in (r.files('paddler_sync.fleet') / 'lua').iterdir()))"],
                           capture_output=True, text=True)
    assert "dashboard.html" in probe.stdout and "take.lua" in probe.stdout, probe.stderr
    assert "grant.lua" in probe.stdout, probe.stdout


def streamed_completion(proxy_port: int) -> list[dict]:
    response = requests.post(f"http://127.0.0.1:{proxy_port}/completion", stream=True, timeout=10,
                             json={"prompt": "hello", "n_predict": 5, "stream": True})
    assert response.status_code == 200, response.text
    events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: ")]
    assert events and events[-1]["stop"] is True
    return events


def start_fleet_from(bin_dir: Path, fleet: Fleet, management_port: int) -> None:
    """A simulator and its agent, both from the installed package."""
    env = {"PYTHONPATH": ""}
    sim_port = free_port()
    fleet.spawn("simulator", [str(bin_dir / "paddler-sync"), "simulate", "--addr", f"127.0.0.1:{sim_port}",
                              "--parallel", "2"], sim_port, env=env)
    fleet.spawn("agent", [str(bin_dir / "paddler-sync"), "agent", "--local-llamacpp-addr", f"127.0.0.1:{sim_port}",
                          "--management-addr", f"127.0.0.1:{management_port}", "--monitoring-interval", "0.2"],
                env=env)
    wait_until(lambda: requests.get(f"http://127.0.0.1:{management_port}/health", timeout=5).json()["slots_idle"] == 2,
               timeout=20, message="the installed agent registered")


def test_the_installed_package_has_no_test_only_imports(installed: Path) -> None:
    probe = subprocess.run([str(installed / "python"), "-c", "import pytest"], capture_output=True)
    assert probe.returncode != 0, "the fresh venv has test extras: the check below would prove nothing"


def test_paddler_sync_balancer_from_a_plain_install_streams(installed: Path, fleet: Fleet) -> None:
    proxy_port, management_port = free_port(), free_port()
    fleet.spawn("balancer", [str(installed / "paddler-sync"), "balancer", "--reverseproxy-addr",
                             f"127.0.0.1:{proxy_port}", "--management-addr", f"127.0.0.1:{management_port}"],
                management_port, env={"PYTHONPATH": ""})
    start_fleet_from(installed, fleet, management_port)
    assert len(streamed_completion(proxy_port)) >= 2


def test_gunicorn_with_the_packaged_settings_from_a_plain_install_streams(installed: Path, fleet: Fleet,
                                                                          tmp_path: Path) -> None:
    app_dir = tmp_path / "app"  # wsgi.py alone: the package must come from the venv, not this checkout
    app_dir.mkdir()
    shutil.copy(ROOT / "wsgi.py", app_dir / "wsgi.py")
    proxy_port, management_port = free_port(), free_port()
    gunicorn = fleet.spawn("gunicorn", [str(installed / "gunicorn"), "-c", "python:paddler_sync.gunicorn_conf",
                                        "-b", f"127.0.0.1:{proxy_port}", "--chdir", str(app_dir), "wsgi:balancer"],
                           management_port,
                           env={"PYTHONPATH": "", "PADDLER_MANAGEMENT_ADDR": f"127.0.0.1:{management_port}"},
                           cwd=app_dir)
    wait_until(lambda: port_open(proxy_port), message="gunicorn's proxy port")
    start_fleet_from(installed, fleet, management_port)
    assert len(streamed_completion(proxy_port)) >= 2
    assert "ModuleNotFoundError" not in gunicorn.log()
    assert "without paddler_sync's gunicorn settings" not in gunicorn.log() and "Control socket" not in gunicorn.log()
