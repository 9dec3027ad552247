"""``paddler-sync dashboard``: the fleet in the terminal, with Textual.

Textual runs on asyncio, which does not mix with a gevent-patched process, so this command never
patches (see cli.py) and fetches the management API with requests in a worker thread. The table is
Paddler's (Name | Issues | Llama.cpp address | Last update | Idle slots | Processing slots), plus the
buffer and totals. Agent names are shown as plain text, never as markup.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import requests
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

COLUMNS = ("Name", "Issues", "Llama.cpp address", "Last update", "Idle slots", "Processing slots")
LOADING = "Loading agents..."
EMPTY = "There are no agents registered. If agents are running, please give them a few seconds to register."
FOOTER = "(Esc|q) quit | (↑|k) move up | (↓|j) move down"
SHORT_ISSUES = {  # a terminal row has no room for the web dashboard's full hints
    "unreachable": "Unreachable: is llama-server running?",
    "unauthorized": "Unauthorized: pass --llamacpp-api-key",
    "slots_disabled": "Slots endpoint off: start llama-server with --slots",
    "loading": "Loading model",
    "malformed": "Malformed /slots answer",
    "unexpected_status": "Unexpected /slots status",
}


def issues_text(agent: dict[str, Any]) -> str:
    if agent.get("quarantined_until"):
        until = time.strftime("%H:%M:%S", time.gmtime(agent["quarantined_until"]["secs_since_epoch"]))
        return f"Quarantined until {until} UTC"
    if agent["state"] == "ready":
        return "Sleeping: its first request reloads the model" if agent.get("is_sleeping") else "None"
    return SHORT_ISSUES.get(agent["state"], agent["state"])


def row_for(agent: dict[str, Any]) -> tuple[Text, ...]:
    updated = time.strftime("%Y/%m/%d, %H:%M:%S", time.gmtime(agent["last_update"]["secs_since_epoch"]))
    cells = (agent.get("agent_name") or "", issues_text(agent), agent["external_llamacpp_addr"], updated,
             str(agent["slots_idle"]), str(agent["slots_processing"]))
    return tuple(Text(str(c)) for c in cells)


def totals_text(health: dict[str, Any]) -> str:
    return (f"agents {health['agents_ready']}/{health['agents']} ready | slots idle {health['slots_idle']}, "
            f"processing {health['slots_processing']} of {health['slots_total']} | in flight "
            f"{health['requests_in_flight']} | waiting {health['requests_buffered']} "
            f"(oldest {health['oldest_buffered_seconds']:.1f}s)")


class FleetDashboard(App):
    CSS = """
    #message { padding: 0 1; color: $warning; }
    #totals { padding: 0 1; color: $text-muted; }
    #footer { padding: 0 1; color: $text-muted; }
    DataTable { height: 1fr; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"), Binding("escape", "quit", "quit"),
        Binding("j", "move(1)", "down", show=False), Binding("k", "move(-1)", "up", show=False),
    ]

    def __init__(self, management_url: str, refresh_interval: float = 0.5, token: str | None = None) -> None:
        super().__init__()
        self.management_url = management_url.rstrip("/")
        self.refresh_interval = refresh_interval
        self.message = LOADING
        self.ticks = 0
        self.session = requests.Session()
        self.session.trust_env = False
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def compose(self) -> ComposeResult:
        yield Static(Text("paddler_sync fleet: " + self.management_url), id="title")
        yield Static(Text(LOADING), id="message")
        yield DataTable(id="agents", cursor_type="row", zebra_stripes=True)
        yield Static("", id="totals")
        yield Static(FOOTER, id="footer")

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*COLUMNS)
        self.fetch()
        self.set_interval(self.refresh_interval, self.fetch)

    @work(thread=True, exclusive=True)
    def fetch(self) -> None:
        try:
            agents = self.session.get(f"{self.management_url}/api/v1/agents", timeout=2).json()["agents"]
            health = self.session.get(f"{self.management_url}/health", timeout=2).json()
        except (requests.RequestException, ValueError, KeyError) as exc:
            self.call_from_thread(self.show_error, exc)
            return
        self.call_from_thread(self.show, agents, health)

    def show(self, agents: list[dict[str, Any]], health: dict[str, Any]) -> None:
        self.ticks += 1
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        for agent in agents:
            table.add_row(*row_for(agent), key=agent["agent_id"])
        if agents:
            table.move_cursor(row=min(cursor, len(agents) - 1))
        self._set_message("" if agents else EMPTY)
        self.query_one("#totals", Static).update(Text(f"{totals_text(health)} | current tick: {self.ticks}"))

    def show_error(self, exc: Exception) -> None:
        self._set_message(f"Cannot reach the balancer at {self.management_url}: {type(exc).__name__}. "
                          f"Retrying every {self.refresh_interval:g}s...")

    def _set_message(self, text: str) -> None:
        self.message = text
        self.query_one("#message", Static).update(Text(text))

    def action_move(self, step: int) -> None:
        """j/k and the arrows move the selection, wrapping around like Paddler's dashboard."""
        table = self.query_one(DataTable)
        if table.row_count:
            table.move_cursor(row=(table.cursor_row + step) % table.row_count)


def management_url(options: argparse.Namespace) -> str:
    return f"{options.management_addr.url}{options.management_path_prefix or ''}"


def run_dashboard(options: argparse.Namespace) -> int:
    FleetDashboard(management_url(options), options.refresh_interval, options.management_token).run()
    return 0
