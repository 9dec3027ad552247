"""Settings as an operator meets them: a bad value, an unknown key or a misspelt flag stops the command with one
line naming the setting, its source and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from paddler_sync.settings_docs import settings_page
from tests.helpers import run_cli

BAD_VALUES = [
    (["balancer", "--management-addr", "nowhere"], "--management-addr", "nowhere"),
    (["balancer", "--max-buffered-requests", "-1"], "--max-buffered-requests", "-1"),
    (["balancer", "--buffered-request-timeout", "soon"], "--buffered-request-timeout", "soon"),
    (["balancer", "--max-request-body", "huge"], "--max-request-body", "huge"),
    (["agent", "--monitoring-interval", "0"], "--monitoring-interval", "0"),
    (["agent", "--local-llamacpp-addr", "[::1]"], "--local-llamacpp-addr", "[::1]"),
    (["simulate", "--dialect", "b9999"], "--dialect", "b9999"),
    (["balancer", "--log-level", "loud"], "--log-level", "loud"),
]


@pytest.mark.parametrize("argv,flag,value", BAD_VALUES)
def test_bad_value_is_one_line_naming_setting_value_and_expectation(argv: list[str], flag: str, value: str,
                                                                    tmp_path: Path) -> None:
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0] and f"'{value}'" in lines[0]
    assert "expected" in lines[0] or "must be" in lines[0] or "one of" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_value_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    result = run_cli("balancer", env={"PADDLER_MANAGEMENT_ADDR": "127.0.0.1:http"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "PADDLER_MANAGEMENT_ADDR" in result.stderr and "'127.0.0.1:http'" in result.stderr


def test_bad_value_from_a_config_file_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "agent.conf").write_text("# the agent\n\nname = gpu-1\nmonitoring-interval = never\n")
    result = run_cli("agent", cwd=tmp_path)
    assert result.returncode == 2
    assert "--monitoring-interval" in result.stderr and "(from conf/agent.conf line 4)" in result.stderr


@pytest.mark.parametrize(("line", "message"), [
    ("max_bufered_requests = 3", "unknown setting `max_bufered_requests` in conf/balancer.conf line 2 "
                                 "(did you mean `max_buffered_requests`?)"),
    ("max-bufered-requests = 3", "(did you mean `max-buffered-requests`?)"),
    ("local-llamacpp-addr = 127.0.0.1:8081", "it is a setting of `paddler-sync agent`, not of `balancer`"),
    ("frobnicate = 1", "unknown setting `frobnicate` in conf/balancer.conf line 2: `paddler-sync balancer --help`"),
])
def test_unknown_config_keys_are_named_with_file_line_and_fix(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "balancer.conf").write_text(f"# settings\n{line}\n")
    result = run_cli("balancer", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "unrecognized arguments" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_setting_and_unknown_command(tmp_path: Path) -> None:
    result = run_cli("balancer", "--no-such-thing", cwd=tmp_path)
    assert result.returncode == 2 and "--no-such-thing" in result.stderr
    result = run_cli("frobnicate", cwd=tmp_path)
    assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr


def test_help_groups_the_settings_under_the_reference_headings() -> None:
    shown = run_cli("balancer", "--help").stdout
    headings = [line.removeprefix("## ") for line in settings_page().splitlines() if line.startswith("## ")]
    balancer_headings = [h for h in headings if h.startswith(("Every", "Balancer"))]
    assert [h for h in balancer_headings if f"\n{h}:\n" in shown] == balancer_headings
    buffering = shown[shown.index("\nBalancer: buffering:"):shown.index("\nBalancer: routing and models:")]
    assert "  --max-buffered-requests" in buffering and "  --policy" not in buffering


def test_a_misspelt_flag_names_the_closest_one(tmp_path: Path) -> None:
    result = run_cli("balancer", "--reverse-proxy-addr", "127.0.0.1:1", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--reverse-proxy-addr (did you mean --reverseproxy-addr?)" in result.stderr
    assert "127.0.0.1:1" not in result.stderr  # the value is not the mistake
    result = run_cli("balancer", "--local-llamacpp-addr", "127.0.0.1:1", cwd=tmp_path)
    assert "a setting of `paddler-sync agent`, not of `balancer`" in result.stderr


def test_a_misspelt_environment_variable_stops_the_start_and_names_the_closest(tmp_path: Path) -> None:
    result = run_cli("balancer", env={"PADDLER_MAX_BUFERED_REQUESTS": "3"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown environment variable PADDLER_MAX_BUFERED_REQUESTS (did you mean " \
           "PADDLER_MAX_BUFFERED_REQUESTS?)" in result.stderr
