"""Settings: one declaration feeds CLI, config file, environment and the reference; bad values fail in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from paddler_sync.addresses import AddressError, parse_address
from paddler_sync.settings import SETTINGS, parse_settings
from paddler_sync.settings_docs import conf_file, settings_page
from tests.helpers import ROOT, run_cli


def test_defaults_follow_paddler() -> None:
    options = parse_settings("balancer", args=[], config_files=[])
    assert options.max_buffered_requests == 30
    assert options.buffered_request_timeout == 10.0
    assert options.statsd_prefix == "paddler"
    assert options.management_dashboard_enable is False
    agent = parse_settings("agent", args=[], config_files=[])
    assert agent.monitoring_interval == 1.0
    assert agent.external_llamacpp_addr is None


def test_precedence_defaults_file_environment_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "balancer.conf"
    conf.write_text("max-buffered-requests = 5\nbuffered-request-timeout = 2.5\nstatsd-prefix = fromfile\n"
                    "management-dashboard-enable = true\n")
    options = parse_settings("balancer", args=[], config_files=[str(conf)])
    assert (options.max_buffered_requests, options.buffered_request_timeout) == (5, 2.5)
    assert options.management_dashboard_enable is True

    monkeypatch.setenv("PADDLER_MAX_BUFFERED_REQUESTS", "7")
    monkeypatch.setenv("PADDLER_MANAGEMENT_DASHBOARD_ENABLE", "0")
    options = parse_settings("balancer", args=[], config_files=[str(conf)])
    assert options.max_buffered_requests == 7
    assert options.buffered_request_timeout == 2.5  # still from the file
    assert options.management_dashboard_enable is False  # environment beats the file

    options = parse_settings("balancer", args=["--max-buffered-requests", "9", "--management-dashboard-enable"],
                             config_files=[str(conf)])
    assert options.max_buffered_requests == 9
    assert options.management_dashboard_enable is True
    assert options.statsd_prefix == "fromfile"


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("false", False), ("0", False)])
def test_switches_from_the_environment(value: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PADDLER_REWRITE_HOST_HEADER", value)
    assert parse_settings("balancer", args=[], config_files=[]).rewrite_host_header is expected


def test_config_flag_picks_another_file(tmp_path: Path) -> None:
    conf = tmp_path / "other.conf"
    conf.write_text("name = from-config\nmonitoring-interval = 250ms\n")
    options = parse_settings("agent", args=["--config", str(conf)], config_files=[])
    assert options.name == "from-config"
    assert options.monitoring_interval == 0.25


def test_agent_accepts_the_old_api_key_flag() -> None:
    options = parse_settings("agent", args=["--local-llamacpp-api-key", "k1"], config_files=[])
    assert options.llamacpp_api_key == "k1"


@pytest.mark.parametrize("text,host,port", [
    ("127.0.0.1:8080", "127.0.0.1", 8080), ("[::1]:9000", "::1", 9000),
    ("llama-1.internal:8081", "llama-1.internal", 8081), ("localhost:1", "localhost", 1),
])
def test_address_forms(text: str, host: str, port: int) -> None:
    addr = parse_address(text)
    assert (addr.host, addr.port) == (host, port)
    assert str(addr) == text


@pytest.mark.parametrize("text", ["8080", "host", "host:0", "host:70000", "::1:80", "[zz]:80", "bad host:1", ":80"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(AddressError):
        parse_address(text)


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


def test_config_keys_may_use_underscores(tmp_path: Path) -> None:
    conf = tmp_path / "balancer.conf"
    conf.write_text("max_buffered_requests = 7\nmanagement_dashboard_enable = true\n")
    options = parse_settings("balancer", args=[], config_files=[str(conf)])
    assert options.max_buffered_requests == 7 and options.management_dashboard_enable is True


def test_unknown_setting_and_unknown_command(tmp_path: Path) -> None:
    result = run_cli("balancer", "--no-such-thing", cwd=tmp_path)
    assert result.returncode == 2 and "--no-such-thing" in result.stderr
    result = run_cli("frobnicate", cwd=tmp_path)
    assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr


def test_every_setting_has_help_and_an_environment_variable() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    for setting in SETTINGS:
        assert setting.help and setting.env == "PADDLER_" + setting.name.replace("-", "_").upper()


def test_the_settings_reference_is_generated_from_the_declarations() -> None:
    page = (ROOT / "docs" / "reference" / "settings.md").read_text()
    assert page == settings_page(), "docs/reference/settings.md is stale: python -m paddler_sync.settings_docs write"
    for setting in SETTINGS:
        assert f"`{setting.env}`" in page


def test_help_groups_the_settings_under_the_reference_headings() -> None:
    shown = run_cli("balancer", "--help").stdout
    headings = [line.removeprefix("## ") for line in settings_page().splitlines() if line.startswith("## ")]
    balancer_headings = [h for h in headings if h.startswith(("Every", "Balancer"))]
    assert [h for h in balancer_headings if f"\n{h}:\n" in shown] == balancer_headings
    buffering = shown[shown.index("\nBalancer: buffering:"):shown.index("\nBalancer: routing and models:")]
    assert "  --max-buffered-requests" in buffering and "  --policy" not in buffering


@pytest.mark.parametrize("command", ["balancer", "agent"])
def test_conf_examples_are_generated_from_the_declarations(command: str) -> None:
    """Every setting, at its real default: the example files cannot claim a default the code does not have."""
    assert (ROOT / "conf" / f"{command}.conf").read_text() == conf_file(command), \
        "conf examples are stale: run python -m paddler_sync.settings_docs write"
    assert "# context-check = prompt\n" in conf_file("balancer") and "# policy = first-token\n" in conf_file("balancer")


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


def test_an_unrelated_paddler_variable_is_named_in_a_warning_only() -> None:
    from paddler_sync.setting_errors import check_environment

    with pytest.raises(SystemExit):
        check_environment("agent", {"PADDLER_MONITORING_INTERVALL": "1"}, SETTINGS)
    check_environment("agent", {"PADDLER_HOME": "/srv", "PADDLER_NAME": "gpu-1"}, SETTINGS)  # no exit


def test_conf_examples_name_only_real_settings(tmp_path: Path) -> None:
    for command in ("balancer", "agent"):
        text = (ROOT / "conf" / f"{command}.conf").read_text()
        keys = re.findall(r"^# ?([a-z][a-z0-9-]+) = ", text, re.M)
        assert keys
        known = {s.name for s in SETTINGS if command in s.commands}
        assert set(keys) <= known, set(keys) - known
        # every example parses when uncommented
        uncommented = "\n".join(line.lstrip("# ") for line in text.splitlines() if re.match(r"^# ?[a-z-]+ = ", line))
        path = tmp_path / f"{command}.conf"
        path.write_text(uncommented)
        parse_settings(command, args=[], config_files=[str(path)])
