"""The terminal dashboard, driven by Textual's own test harness (no real terminal) against a real balancer."""

from __future__ import annotations

import asyncio

import pytest
from textual.widgets import DataTable

from paddler_sync.tui import EMPTY, LOADING, FleetDashboard
from tests.conftest import Fleet, agents, free_port, wait_until


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
        async with app.run_test(size=(160, 30)) as pilot:
            await settle(pilot, app, lambda: app.message == EMPTY)
            for name, sim in zip(("alpha", "[b]bold[/b]"), sims, strict=True):
                fleet.agent(sim.port, balancer.extra["management_port"], "--name", name, interval=0.2)
            await settle(pilot, app, lambda: len(rows(app)) == 2 and app.message == "")
            table = rows(app)
            assert [r[0] for r in table] == ["[b]bold[/b]", "alpha"]  # markup is shown, never interpreted
            assert table[1][1] == "None" and table[1][4:] == ["2", "0"]
            assert "slots idle 6" in str(app.query_one("#totals").render())
            cursor = app.query_one(DataTable)
            assert cursor.cursor_row == 0
            await pilot.press("j")
            assert cursor.cursor_row == 1
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
            assert "start llama-server with --slots" in rows(app)[0][1]

    asyncio.run(scenario())


@pytest.mark.parametrize("argv", [["dashboard", "--management-addr", "nowhere"]])
def test_dashboard_command_rejects_bad_addresses(argv: list[str], tmp_path) -> None:
    from tests.conftest import run_cli

    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2 and "--management-addr" in result.stderr
