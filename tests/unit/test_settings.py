"""Settings, in process: one declaration feeds the command line, config files, environment, --help and the
reference; values parse or are refused with the setting named (what a start-up prints: live/test_settings_cli.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from paddler_sync.addresses import AddressError, parse_address
from paddler_sync.settings import SETTINGS, parse_settings
from paddler_sync.settings_docs import conf_file, settings_page
from tests.helpers import ROOT


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


def test_config_keys_may_use_underscores(tmp_path: Path) -> None:
    conf = tmp_path / "balancer.conf"
    conf.write_text("max_buffered_requests = 7\nmanagement_dashboard_enable = true\n")
    options = parse_settings("balancer", args=[], config_files=[str(conf)])
    assert options.max_buffered_requests == 7 and options.management_dashboard_enable is True


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


@pytest.mark.parametrize("command", ["balancer", "agent"])
def test_conf_examples_are_generated_from_the_declarations(command: str) -> None:
    """Every setting, at its real default: the example files cannot claim a default the code does not have."""
    assert (ROOT / "conf" / f"{command}.conf").read_text() == conf_file(command), \
        "conf examples are stale: run python -m paddler_sync.settings_docs write"
    assert "# context-check = prompt\n" in conf_file("balancer") and "# policy = first-token\n" in conf_file("balancer")


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
