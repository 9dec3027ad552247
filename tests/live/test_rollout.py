"""The supervisor's rules without processes: the command lines an agent runs, what reports say about it, and the
balancer's answers (grants, limits, halts, adoption after a restart). Processes: tests/live/test_supervisor.py."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from paddler_sync.addresses import Address
from paddler_sync.agent.launch import CommandLine, monitoring_flags, option_value, program, without_options
from paddler_sync.cli import supervised_command
from paddler_sync.fleet.registry import Registry
from paddler_sync.fleet.rollout import LocalControls, Rollout
from paddler_sync.ledger.ledger import Ledger
from paddler_sync.protocol.reports import ReportError, parse_report
from paddler_sync.protocol.supervision import DesiredState, SupervisionError, desired_from_request
from paddler_sync.settings import parse_settings
from tests.helpers import PADDLER_SYNC, good_report, real_builds, run_cli

# --- command lines -----------------------------------------------------------------------------------------------


def test_option_values_are_read_and_removed_in_both_spellings() -> None:
    argv = ["llama-server", "-m", "a.gguf", "--port=8081", "--host", "0.0.0.0", "-np", "4"]
    assert option_value(argv, ("--port",)) == "8081" and option_value(argv, ("-m", "--model")) == "a.gguf"
    assert without_options(argv, ("--host", "--port")) == ["llama-server", "-m", "a.gguf", "-np", "4"]
    assert program(["paddler-sync", "simulate", "-m", "x"]) == ["paddler-sync", "simulate"]
    assert program(["/v/bin/python3", "-m", "paddler_sync", "simulate", "-m", "x"]) == [
        "/v/bin/python3", "-m", "paddler_sync", "simulate"]


def test_every_command_listens_where_the_first_did_and_a_desired_state_changes_the_rest() -> None:
    command = CommandLine(("llama-server", "-m", "tiny.gguf", "-np", "4", "--port", "9000", "--slots"),
                          Address("127.0.0.1", 9000), ("--slots", "--metrics"))
    assert command.argv() == ["llama-server", "-m", "tiny.gguf", "-np", "4", "--slots", "--metrics",
                              "--host", "127.0.0.1", "--port", "9000"]
    assert command.argv(model="slow.gguf") == ["llama-server", "-np", "4", "--slots", "-m", "slow.gguf", "--metrics",
                                               "--host", "127.0.0.1", "--port", "9000"]
    swapped = command.argv(args=["-m", "big.gguf", "--port", "1", "-c", "8192"])
    assert swapped == ["llama-server", "-m", "big.gguf", "-c", "8192", "--slots", "--metrics", "--host", "127.0.0.1",
                       "--port", "9000"]  # its own --port cannot move the server away from where the balancer knows


def test_without_a_port_the_agent_picks_a_free_one() -> None:
    command = CommandLine.prepare([PADDLER_SYNC, "simulate", "-np", "2"])
    assert command.listen.host == "127.0.0.1" and 0 < command.listen.port < 65536
    assert command.added == ()  # the simulator's --help: /slots and /metrics are on by default
    assert CommandLine.prepare(["llama-server-that-does-not-exist", "--port", "8123"]).added == ()


@pytest.mark.real_llamacpp
@pytest.mark.parametrize("build", real_builds())
def test_the_monitoring_flags_each_real_build_takes(build: Any) -> None:
    help_text = subprocess.run([str(build.path), "--help"], capture_output=True, text=True, timeout=20).stdout
    needed = ["--metrics"] if build.modern else ["--slots", "--metrics"]  # 2026 serves /slots by default
    assert monitoring_flags(["x", "-m", "m.gguf"], help_text) == needed
    assert monitoring_flags(["x", "--no-slots", "--metrics"], help_text) == []  # what the operator said stands


def test_the_command_after_double_dash_becomes_the_setting() -> None:
    args = supervised_command(["--name", "a", "--supervise", "--", "llama-server", "-m", "my model.gguf"])
    assert args == ["--name", "a", "--supervise=llama-server -m 'my model.gguf'"]
    options = parse_settings("agent", args, config_files=[])
    assert options.supervise == ("llama-server", "-m", "my model.gguf")
    with pytest.raises(SystemExit):
        supervised_command(["--name", "a", "--", "llama-server"])


def test_labels_and_the_command_from_a_config_file(tmp_path: Any) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text("supervise = llama-server -m tiny.gguf -np 2\nlabel = gpu=a100,zone=eu\n")
    options = parse_settings("agent", [], config_files=[str(conf)])
    assert options.supervise == ("llama-server", "-m", "tiny.gguf", "-np", "2")
    assert options.label == {"gpu": "a100", "zone": "eu"}


# --- the balancer's answers ---------------------------------------------------------------------------------------


def supervised(desired_running: DesiredState | None = None, working_on: DesiredState | None = None,
               failed_id: str | None = None, labels: dict[str, str] | None = None, port: int = 9001,
               **changes: Any) -> Any:
    supervisor = {"state": "ready", "command": ["llama-server"], "restarts": 0,
                  "applied": desired_running.to_json() if desired_running else None,
                  "working_on": working_on.to_json() if working_on else None,
                  "phase": "starting" if working_on else None, "failed_id": failed_id}
    return parse_report(json.dumps(good_report(external_llamacpp_addr=f"127.0.0.1:{port}", supervisor=supervisor,
                                               labels=labels or {}, **changes)))


def rollout(max_unavailable: int = 1, controls: LocalControls | None = None) -> Rollout:
    ledger = Ledger()
    return Rollout(controls or LocalControls(), Registry(ledger), ledger, max_unavailable, 60.0, clock=lambda: 1000.0)


def report_all(r: Rollout, reports: dict[str, Any]) -> dict[str, Any]:
    """Each agent reports once; the answers."""
    answers = {}
    for agent_id, report in reports.items():
        answers[agent_id] = r.control(agent_id, report)
        r.registry.apply(agent_id, report, draining=answers[agent_id].draining)
    return answers


def test_a_fleet_wide_state_goes_to_one_server_at_a_time() -> None:
    r = rollout(max_unavailable=1)
    report_all(r, {"a": supervised(port=1), "b": supervised(port=2)})
    desired = desired_from_request({"model": "slow.gguf"}, "fleet", 60.0, now=500.0)
    assert r.set_fleet(desired) == ["a", "b"]
    answers = report_all(r, {"a": supervised(port=1), "b": supervised(port=2)})
    assert answers["a"].apply == desired and answers["a"].draining
    assert answers["b"].apply is None and not answers["b"].draining  # waits its turn, serving meanwhile
    answers = report_all(r, {"a": supervised(working_on=desired, port=1), "b": supervised(port=2)})
    assert answers["b"].apply is None
    assert r.fleet_status()["counts"] == {"applying": 1, "pending": 1}
    answers = report_all(r, {"a": supervised(desired, port=1), "b": supervised(port=2)})
    assert answers["a"].apply is None and not answers["a"].draining  # applied: it serves again
    assert answers["b"].apply == desired
    assert r.registry.get("a").draining is False and r.registry.get("b").draining is True


def test_two_at_a_time_when_allowed_and_an_agents_own_state_needs_no_turn() -> None:
    r = rollout(max_unavailable=2)
    r.set_fleet(desired_from_request({"model": "x"}, "fleet", 60.0, now=500.0))
    answers = report_all(r, {k: supervised(port=i + 1) for i, k in enumerate("abc")})
    assert [answers[k].apply is not None for k in "abc"] == [True, True, False]
    own = desired_from_request({"model": "y"}, "agent", 60.0, now=600.0)
    r.set_desired("c", own)
    assert r.control("c", supervised(port=3)).apply == own  # newer than the fleet's, and not limited


def test_a_selector_picks_servers_by_their_labels() -> None:
    r = rollout()
    report_all(r, {"a": supervised(port=1, labels={"gpu": "a100"}), "b": supervised(port=2, labels={"gpu": "t4"})})
    desired = desired_from_request({"model": "x", "selector": {"gpu": "a100"}}, "fleet", 60.0, now=500.0)
    assert r.set_fleet(desired) == ["a"]
    answers = report_all(r, {"a": supervised(port=1, labels={"gpu": "a100"}),
                             "b": supervised(port=2, labels={"gpu": "t4"})})
    assert answers["a"].apply == desired and answers["b"].apply is None


def test_a_state_that_failed_on_one_server_halts_the_rollout_and_is_not_retried() -> None:
    r = rollout()
    desired = desired_from_request({"model": "bad.gguf"}, "fleet", 60.0, now=500.0)
    r.set_fleet(desired)
    report_all(r, {"a": supervised(port=1), "b": supervised(port=2)})
    answers = report_all(r, {"a": supervised(failed_id=desired.id, port=1), "b": supervised(port=2)})
    assert answers["a"].apply is None and not answers["a"].draining  # rolled back: serves again
    assert answers["b"].apply is None
    assert r.fleet_status()["counts"] == {"failed": 1, "halted": 1}


def test_a_restarted_balancer_adopts_the_agents_copies() -> None:
    desired = desired_from_request({"model": "slow.gguf"}, "fleet", 60.0, now=500.0)
    r = rollout()  # knows nothing
    report = supervised(working_on=desired, port=1, drain={"on": True, "seq": 400.0})
    answer = r.control("a", report)
    assert r.controls.fleet() == desired and answer.apply == desired  # the swap resumes
    assert answer.drain.on  # and the drain the agent carries stays
    r.set_drain("a", False)
    assert not r.control("a", report).drain.on  # an older copy does not undo a newer undrain
    newer = desired_from_request({"model": "tiny.gguf"}, "fleet", 60.0, now=900.0)
    r.set_fleet(newer)
    r.control("a", supervised(desired, port=1))
    assert r.controls.fleet() == newer  # an older applied state is not adopted over a newer one


def test_reports_with_bad_supervision_fields_are_refused() -> None:
    for supervisor, words in (({"state": "dancing"}, "supervisor state"),
                              ({"state": "ready", "applied": {"model": 3}}, "'model'"),
                              ({"state": "ready", "pid": "1"}, "pid"),
                              ("ready", "JSON object")):
        with pytest.raises(ReportError, match=words):
            parse_report(json.dumps(good_report(supervisor=supervisor)))
    with pytest.raises(ReportError, match="labels"):
        parse_report(json.dumps(good_report(labels={"gpu": 1})))
    with pytest.raises(ReportError, match="drain"):
        parse_report(json.dumps(good_report(drain={"on": "yes"})))
    with pytest.raises(SupervisionError, match="selector"):
        desired_from_request({"model": "x", "selector": ["gpu"]}, "fleet", 60.0)
    with pytest.raises(SupervisionError, match="unknown"):
        desired_from_request({"model": "x", "selector": {}}, "agent", 60.0)
    with pytest.raises(SupervisionError, match="at most 8192 bytes"):  # it travels in every report
        desired_from_request({"args": ["--flag"] * 2000}, "agent", 60.0)


def test_a_program_that_cannot_run_and_a_stray_double_dash_are_named() -> None:
    done = run_cli("agent", "--supervise", "--", "llama-sever", "-m", "x.gguf")
    assert done.returncode == 2 and "--supervise: cannot run `llama-sever`: no such program" in done.stderr
    done = run_cli("agent", "--name", "a", "--", "llama-server")
    assert done.returncode == 2 and "a command after -- needs --supervise before it" in done.stderr
