"""The terminal dashboard, driven by Textual's own test harness (no real terminal) against a real balancer."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest
import requests
from textual.widgets import DataTable

from paddler_sync.tui import EMPTY, LOADING, FleetDashboard
from tests.helpers import PADDLER_SYNC, ROOT, Fleet, agents, free_port, run_cli, wait_until

ARTIFACTS = ROOT / "test-artifacts"


def rows(app: FleetDashboard) -> list[list[str]]:
    table = app.query_one(DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


async def settle(pilot, app: FleetDashboard, condition, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if condition():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"the dashboard did not settle: message={app.message!r} rows={rows(app)}")


def test_cannot_reach_the_balancer() -> None:
    async def scenario() -> None:
        app = FleetDashboard(f"http://127.0.0.1:{free_port()}", refresh_interval=0.2)
        async with app.run_test(size=(140, 30)) as pilot:
            assert app.message == LOADING or app.message.startswith("Cannot reach")
            await settle(pilot, app, lambda: app.message.startswith("Cannot reach the balancer"))
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(scenario())


def test_empty_then_agents_and_keys(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    sims = [fleet.simulator("--parallel", str(n)) for n in (2, 4)]

    async def scenario() -> None:
        app = FleetDashboard(balancer.extra["management"], refresh_interval=0.2)
        async with app.run_test(size=(80, 30)) as pilot:  # a plain 80-column terminal
            await settle(pilot, app, lambda: app.message == EMPTY)
            for name, sim in zip(("alpha", "[b]bold[/b]"), sims, strict=True):
                fleet.agent(sim.port, balancer.extra["management_port"], "--name", name, interval=0.2)
            await settle(pilot, app, lambda: len(rows(app)) == 2 and app.message == "")
            assert requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x", "n_predict": 9},
                                 timeout=10).status_code == 200
            await settle(pilot, app, lambda: any(r[6] not in ("-", "0.00") for r in rows(app)))
            table = rows(app)
            assert [r[0] for r in table] == ["[b]bold[/b]", "alpha"]  # markup is shown, never interpreted
            assert table[1][1:5] == ["None", "2", "0", "0"]  # issues, idle, busy, in flight
            served = next(r for r in table if r[5] != "-")
            assert float(served[6]) > 0 and served[8] == "none"  # tokens/s from llama.cpp's count, no errors
            columns = list(app.query_one(DataTable).columns.values())
            widths = [c.get_render_width(app.query_one(DataTable)) for c in columns]
            assert sum(widths[:9]) <= 80 and widths[8] >= 8  # every column up to Errors, Errors readable
            assert widths[1] == len("Issues") + 2  # "None" needs no 16 columns
            totals = str(app.query_one("#totals").render())
            assert "6 idle of 6" in totals and "req/s" in totals and "TTFT p50" in totals and "tick" not in totals
            assert all(len(line) <= 80 for line in totals.splitlines())
            assert totals.splitlines()[-1] == "models: models/simulated.gguf 6/6 free"  # both serve the one model
            detail = str(app.query_one("#detail").render())
            assert detail.startswith("[b]bold[/b] at 127.0.0.1:") and "models models/simulated.gguf 4/4 free" in detail
            ARTIFACTS.mkdir(exist_ok=True)
            app.save_screenshot("tui-80-columns.svg", str(ARTIFACTS))
            cursor = app.query_one(DataTable)
            assert cursor.cursor_row == 0
            await pilot.press("j")
            assert cursor.cursor_row == 1
            assert str(app.query_one("#detail").render()).startswith("alpha at 127.0.0.1:")
            await pilot.press("j")  # wraps around
            assert cursor.cursor_row == 0
            await pilot.press("k")
            assert cursor.cursor_row == 1
            await pilot.press("escape")
        assert app.return_code == 0

    asyncio.run(scenario())


def test_an_agent_in_error_shows_its_hint(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    sim = fleet.simulator("--no-slots")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "off", interval=0.2)
    wait_until(lambda: agents(balancer) and agents(balancer)[0]["state"] == "slots_disabled")

    async def scenario() -> None:
        app = FleetDashboard(balancer.extra["management"], refresh_interval=0.2)
        async with app.run_test(size=(200, 30)) as pilot:
            await settle(pilot, app, lambda: len(rows(app)) == 1)
            assert rows(app)[0][1] == "Slots off"
            detail = app.query_one("#detail")
            await settle(pilot, app, lambda: "start llama-server with --slots" in str(detail.render()))

    asyncio.run(scenario())


def test_the_tenants_view_shows_each_tenants_use(fleet: Fleet) -> None:
    tenants = fleet.workdir / "tenants.toml"
    tenants.write_text('[tenants.chat]\nkeys = ["sk-chat-secret"]\npriority = 10\n\n[tenants.batch]\nkeys = ["sk-b"]\n')
    balancer = fleet.balancer("--tenants", str(tenants))
    sim = fleet.simulator("--parallel", "2")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "one", interval=0.2)
    wait_until(lambda: agents(balancer) and agents(balancer)[0]["state"] == "ready")
    assert requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x", "n_predict": 9},
                         headers={"Authorization": "Bearer sk-chat-secret"}, timeout=10).status_code == 200

    async def scenario() -> None:
        app = FleetDashboard(balancer.extra["management"], refresh_interval=0.2)
        async with app.run_test(size=(80, 30)) as pilot:
            totals = app.query_one("#totals")
            await settle(pilot, app, lambda: "tenants:" in str(totals.render()))
            lines = str(totals.render()).splitlines()
            chat = next(line for line in lines if line.startswith("chat "))
            assert chat.startswith("chat p10: 0 running, 0 waiting | 1 served, 0 refused |") and " 9 out" in chat
            assert any(line.startswith("batch p0: 0 running") for line in lines)
            assert all(len(line) <= 80 for line in lines) and "sk-chat" not in str(totals.render())

    asyncio.run(scenario())


@pytest.mark.parametrize("argv", [["dashboard", "--management-addr", "nowhere"]])
def test_dashboard_command_rejects_bad_addresses(argv: list[str], tmp_path) -> None:

    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2 and "--management-addr" in result.stderr


def test_the_detail_line_and_totals_say_how_much_the_prompt_cache_saved() -> None:
    from paddler_sync.tui import detail_text, totals_text

    agent = {"agent_id": "a", "agent_name": "gpu-1", "external_llamacpp_addr": "10.0.0.5:8080", "state": "ready",
             "models": [{"id": "qwen", "state": "loaded", "slots_idle": 3, "total_slots": 4}]}
    figures = {"cache_hit_ratio": 0.82, "cached_tokens": 41_200}
    assert detail_text(agent, figures) == ("gpu-1 at 10.0.0.5:8080: models qwen 3/4 free; prompt cache hit 82% "
                                           "(41.2k) tokens saved")
    assert detail_text(agent, {"cache_hit_ratio": None}) == "gpu-1 at 10.0.0.5:8080: models qwen 3/4 free"
    health = {"agents_ready": 1, "agents": 1, "slots_processing": 0, "slots_idle": 4, "slots_total": 4,
              "requests_in_flight": 0, "requests_buffered": 0, "oldest_buffered_seconds": 0.0}
    fleet = {"requests_per_second": 12.5, "tokens_per_second": 900.0, "ttft_p50_seconds": 0.1, "ttft_p95_seconds": 0.4,
             "queue_wait_p95_seconds": None, "errors": {}, **figures}
    totals = totals_text(health, {"fleet": fleet})
    assert "cache 82% (41.2k)" in totals and all(len(line) <= 80 for line in totals.splitlines())


def test_a_supervised_server_shows_its_swap_and_the_totals_count_draining_servers() -> None:
    from paddler_sync.tui import detail_text, issues_text, totals_text

    supervisor = {"state": "loading", "pid": 4242, "restarts": 1, "phase": "starting", "failed_id": None,
                  "hint": "llama-server answers 503 while it loads the model; applying desired state d1: starting"}
    agent = {"agent_id": "a", "agent_name": "gpu-1", "external_llamacpp_addr": "10.0.0.5:8080", "state": "loading",
             "hint": "llama.cpp is still loading its model", "supervisor": supervisor}
    assert issues_text(agent) == "Swap: starting"
    assert "llama-server loading (pid 4242, 1 restarts)" in detail_text(agent)
    assert "applying desired state d1: starting" in detail_text(agent)
    assert issues_text({**agent, "supervisor": {**supervisor, "phase": None, "state": "backing_off"}}) == "Backing off"
    assert issues_text({**agent, "state": "draining", "supervisor": None}) == "Draining"
    health = {"agents_ready": 1000, "agents": 2000, "agents_draining": 999, "slots_processing": 99999,
              "slots_idle": 99999, "slots_total": 199998, "requests_in_flight": 9999, "requests_buffered": 0,
              "oldest_buffered_seconds": 0.0}
    fleet = {"requests_per_second": 12.5, "tokens_per_second": 900.0, "ttft_p50_seconds": 0.1,
             "ttft_p95_seconds": 0.4, "queue_wait_p95_seconds": None, "errors": {}, "cache_hit_ratio": None}
    totals = totals_text(health, {"fleet": fleet})
    assert "999 draining" in totals, totals
    assert all(len(line) <= 80 for line in totals.splitlines()), totals


def test_errors_fit_their_cell_and_the_detail_line_has_them_all() -> None:
    from rich.text import Text

    from paddler_sync.tui import column_widths, detail_text, errors_cell

    assert errors_cell({}) == "none" and errors_cell({"timed_out": 4, "llamacpp_500": 1}) == "5 timed_out"
    row = tuple(Text(c) for c in ("gpu-box-with-a-long-name", "Unreachable", "0", "0", "0", "-", "-", "-",
                                  "5 timed_out", "10.0.0.1:8081", "2026-12-07 06:00:00"))
    widths = column_widths([row])
    assert widths["Name"] == 12 and widths["Issues"] == len("Unreachable")
    assert sum(w + 2 for c, w in widths.items() if c not in ("Llama.cpp address", "Last update (UTC)")) <= 80
    agent = {"agent_id": "a", "agent_name": "gpu", "external_llamacpp_addr": "10.0.0.1:8081", "state": "ready"}
    assert "errors timed_out 4, llamacpp_500 1" in detail_text(agent, {"errors": {"timed_out": 4, "llamacpp_500": 1}})


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (Debian's tmux: "
                                                           "scripts/system-packages.sh installs it)")
def test_in_a_real_80x24_terminal_every_column_up_to_errors_shows_and_no_stray_glyph(fleet: Fleet) -> None:
    balancer = fleet.balancer()
    sim = fleet.simulator("--parallel", "2")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "gpu-1", interval=0.2)
    wait_until(lambda: len(agents(balancer)) == 1)
    session = f"paddler-tui-{os.getpid()}"
    command = f"{PADDLER_SYNC} dashboard --management-addr 127.0.0.1:{balancer.extra['management_port']}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", command], check=True)
    try:
        def screen() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                                  check=True).stdout

        def row_shown() -> str | None:
            text = screen()
            return text if "gpu-1" in text else None

        shown = wait_until(row_shown, timeout=20, message="the dashboard's row in tmux")
        lines = shown.splitlines()
        header = next(line for line in lines if line.lstrip().startswith("Name"))
        assert header.split()[:10] == ["Name", "Issues", "Idle", "Busy", "In", "flight", "Req/s", "Tok/s", "TTFT95",
                                       "Errors"], header
        row = next(line for line in lines if "gpu-1" in line)
        assert row.split()[1:9] == ["None", "2", "0", "0", "-", "-", "-", "-"], row  # no traffic yet: "-"
        assert all(len(line) <= 80 for line in lines)
        assert not any(glyph in shown for glyph in "▁▂▃▄▅▆▇█▉▊▋▌▍▎▏"), shown  # no scrollbar drawn in the text
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "tui-tmux-80x24.txt").write_text(shown)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
