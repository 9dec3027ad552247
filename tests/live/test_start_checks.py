"""A balancer whose libraries lack a private part the proxy leans on refuses to start, naming the release and the
fix, instead of failing on the first request with a traceback (paddler_sync/library_checks.py)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import ROOT, run_cli

BREAK_URLLIB3 = """
from urllib3.connectionpool import HTTPConnectionPool
del HTTPConnectionPool._get_conn  # what a future urllib3 might do
"""


def test_a_library_without_what_the_proxy_leans_on_stops_the_start_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BREAK_URLLIB3)
    result = run_cli("balancer", "--reverseproxy-addr", "127.0.0.1:1", env={"PYTHONPATH": f"{tmp_path}:{ROOT}"},
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "paddler-sync balancer: error: urllib3 " in result.stderr
    assert "lacks HTTPConnectionPool._get_conn" in result.stderr and "pip install 'urllib3>=2.0,<3'" in result.stderr
    assert "Traceback" not in result.stderr
