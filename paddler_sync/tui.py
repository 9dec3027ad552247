"""``paddler-sync dashboard``: the fleet in the terminal, with Textual.

Textual runs on asyncio, which does not mix with a gevent-patched process, so this command never
patches (see cli.py) and fetches the management API with requests in a worker thread. The figures are
the web dashboard's (last 5 minutes, from /api/v1/traffic); the columns that matter most come first,
so an 80-column terminal shows them without scrolling (Paddler's address and last update follow).
Agent names are shown as plain text, never as markup. Times are UTC, as on the web dashboard.
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

from paddler_sync.traffic import cache_text, errors_text, rate_text

COLUMNS = ("Name", "Issues", "Idle", "Busy", "In flight", "Req/s", "Tok/s", "TTFT95", "Errors",
           "Llama.cpp address", "Last update (UTC)")
WIDTHS = {"Name": 12, "Issues": 16}  # at most: these fit their contents up to this, then are cut
FIRST_SCREEN = 80  # Name to Errors fit an 80-column terminal; address and last update lie to the right
CELL_PADDING = 2  # Textual's DataTable pads each cell by one column on either side
MIN_ERRORS = 6
LOADING = "Loading agents..."
EMPTY = "There are no agents registered. If agents are running, please give them a few seconds to register."
FOOTER = "(Esc|q) quit | (↑|k) up | (↓|j) down | figures: last 5 min"
SHORT_ISSUES = {  # a cell has room for a word or two; the detail line below the table says what to do
    "unreachable": "Unreachable",
    "unauthorized": "Unauthorized",
    "slots_disabled": "Slots off",
    "loading": "Loading model",
    "malformed": "Bad /slots",
    "unexpected_status": "Bad /slots",
    "balancer_port": "Balancer port",
    "draining": "Draining",
}
SUPERVISOR_WORDS = {"starting": "Starting", "loading": "Loading model", "crashed": "Crashed",
                    "restarting": "Restarting", "backing_off": "Backing off", "stopping": "Stopping"}


def issues_text(agent: dict[str, Any]) -> str:
    if agent.get("quarantined_until"):
        until = time.strftime("%H:%M:%S", time.gmtime(agent["quarantined_until"]["secs_since_epoch"]))
        return f"Quarantined {until}"
    supervisor = agent.get("supervisor") or {}
    if supervisor.get("phase"):
        return f"Swap: {supervisor['phase'].replace('_', ' ')}"
    if supervisor.get("state") in SUPERVISOR_WORDS:
        return SUPERVISOR_WORDS[supervisor["state"]]
    if agent["state"] == "ready":
        return "Sleeping" if agent.get("is_sleeping") else "None"
    return SHORT_ISSUES.get(agent["state"], agent["state"])


def detail_text(agent: dict[str, Any], figures: dict[str, Any] | None = None) -> str:
    """The selected agent in full: its name, address, and what is wrong and what to do, if anything."""
    parts = [f"{agent.get('agent_name') or agent['agent_id']} at {agent['external_llamacpp_addr']}"]
    if agent.get("quarantined_until"):
        until = time.strftime("%H:%M:%S", time.gmtime(agent["quarantined_until"]["secs_since_epoch"]))
        parts.append(f"quarantined until {until} UTC: it refused a connection")
    if agent.get("is_sleeping"):
        parts.append("sleeping: its first request reloads the model")
    if agent["state"] not in ("ready", "quarantined"):
        parts.append(agent.get("hint") or agent["state"])
        if agent.get("error"):
            parts.append(agent["error"])
    supervisor = agent.get("supervisor")
    if supervisor:
        parts.append(f"llama-server {supervisor['state'].replace('_', ' ')} (pid {supervisor['pid'] or '-'}, "
                     f"{supervisor['restarts']} restarts)")
        if supervisor["state"] != "ready" or supervisor["phase"]:
            parts.append(supervisor["hint"])
        if supervisor["failed_id"]:
            parts.append(f"desired state {supervisor['failed_id']} failed: {supervisor['failed_error']}")
    if agent.get("models"):
        parts.append("models " + ", ".join(model_text(m) for m in agent["models"]))
    if figures and figures.get("cache_hit_ratio") is not None:
        parts.append(f"prompt cache hit {cache_text(figures)} tokens saved")
    if figures and figures.get("errors"):
        parts.append(f"errors {errors_text(figures['errors'])}")
    return ": ".join(parts[:2]) + "".join(f"; {p}" for p in parts[2:])


def model_text(model: dict[str, Any]) -> str:
    """``tiny 3/4 free``, or ``slow (unloaded)`` for a router's model that is not loaded."""
    if model["state"] != "loaded":
        return f"{model['id']} ({model['state']})"
    return f"{model['id']} {model['slots_idle']}/{model['total_slots']} free"


def models_text(models: list[dict[str, Any]], width: int = 78) -> str:
    """The fleet's models in one line: free slots of each, and the requests waiting for it."""
    parts = [f"{m['id']} {m['slots_idle']}/{m['slots_total']} free" + (f", {m['requests_buffered']} waiting"
                                                                       if m["requests_buffered"] else "")
             for m in models]
    line = "models: " + " | ".join(parts)
    return line if len(line) <= width else line[: width - 1] + "…"


def tenants_text(tenants: list[dict[str, Any]], width: int = 78) -> str:
    """The tenants (--tenants), one line each: slots held and requests waiting now, then what each has used."""
    lines = []
    for t in tenants:
        refused = sum(t["rejections"].values())
        line = (f"{t['name']} p{t['priority']}: {t['in_flight']} running, {t['waiting']} waiting | "
                f"{t['requests']['served']} served, {refused} refused | {count_text(t['tokens']['prompt'])} in, "
                f"{count_text(t['tokens']['generated'])} out | {t['slot_seconds']:.0f} slot-s")
        lines.append(line if len(line) <= width else line[: width - 1] + "…")
    return "\n".join(["tenants:", *lines]) if lines else ""


def count_text(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}k" if count >= 1e4 else str(count)


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds <= 0.001:  # the finest bin: every wait shorter than a millisecond
        return "<1ms"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


def errors_cell(errors: dict[str, int]) -> str:
    """The count, and the most frequent kind (the detail line lists them all): ``4 timed_out``, ``none``."""
    if not errors:
        return "none"
    top = max(errors, key=lambda kind: errors[kind])
    return f"{sum(errors.values())} {top}"


def column_widths(rows: list[tuple[Text, ...]]) -> dict[str, int]:
    """Name and Issues as wide as their cells need (up to WIDTHS), and Errors what is left of the first 80
    columns, so every column up to Errors shows in an 80-column terminal."""
    widths = {}
    for index, column in enumerate(COLUMNS):
        longest = max([len(column), *(len(row[index]) for row in rows)])
        widths[column] = min(WIDTHS.get(column, longest), longest)
    before_errors = COLUMNS[:COLUMNS.index("Errors")]
    used = sum(widths[c] + CELL_PADDING for c in before_errors) + CELL_PADDING
    widths["Errors"] = max(MIN_ERRORS, min(widths["Errors"], FIRST_SCREEN - used))
    return widths


def row_for(agent: dict[str, Any], figures: dict[str, Any] | None) -> tuple[Text, ...]:
    updated = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(agent["last_update"]["secs_since_epoch"]))
    traffic = (("-",) * 4 if figures is None else
               (rate_text(figures["requests_per_second"]), rate_text(figures["tokens_per_second"]),
                duration_text(figures["ttft_p95_seconds"]), errors_cell(figures["errors"])))
    cells = (agent.get("agent_name") or "", issues_text(agent), str(agent["slots_idle"]),
             str(agent["slots_processing"]), str(agent["slots_in_flight"]), *traffic,
             agent["external_llamacpp_addr"], updated)
    return tuple(Text(str(c)) for c in cells)


def totals_text(health: dict[str, Any], traffic: dict[str, Any]) -> str:
    """The fleet in three lines of at most 80 columns: slots, traffic, errors."""
    fleet = traffic["fleet"]
    draining = f", {health['agents_draining']} draining" if health.get("agents_draining") else ""
    return (f"agents {health['agents_ready']}/{health['agents']} ready{draining} | slots "
            f"{health['slots_processing']} busy, {health['slots_idle']} idle of {health['slots_total']}\n"
            f"waiting {health['requests_buffered']} (oldest {health['oldest_buffered_seconds']:.1f}s) | "
            f"last 5 min: {rate_text(fleet['requests_per_second'])} req/s, {rate_text(fleet['tokens_per_second'])} "
            f"tok/s | cache {cache_text(fleet)}\nin flight {health['requests_in_flight']} | "
            f"TTFT p50 {duration_text(fleet['ttft_p50_seconds'])} p95 "
            f"{duration_text(fleet['ttft_p95_seconds'])} | queue p95 {duration_text(fleet['queue_wait_p95_seconds'])}"
            f" | errors: {errors_text(fleet['errors'])}")


class FleetDashboard(App):
    TITLE = "paddler_sync dashboard"
    CSS = """
    #message { padding: 0 1; color: $warning; }
    #detail { padding: 0 1; }
    #totals { padding: 0 1; color: $text-muted; }
    #footer { padding: 0 1; color: $text-muted; }
    DataTable { height: 1fr; scrollbar-size-horizontal: 0; }
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
        self.agents: dict[str, dict[str, Any]] = {}
        self.figures: dict[str, dict[str, Any]] = {}  # traffic figures by server address
        self.session = requests.Session()
        self.session.trust_env = False
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def compose(self) -> ComposeResult:
        yield Static(Text("paddler_sync fleet: " + self.management_url), id="title")
        yield Static(Text(LOADING), id="message")
        yield DataTable(id="agents", cursor_type="row", zebra_stripes=True)
        yield Static("", id="detail")
        yield Static("", id="totals")
        yield Static(FOOTER, id="footer")

    def on_mount(self) -> None:
        self.widths: dict[str, int] = {}
        self.set_columns(column_widths([]))
        self.fetch()
        self.set_interval(self.refresh_interval, self.fetch)

    @work(thread=True, exclusive=True)
    def fetch(self) -> None:
        try:
            agents = self.get_json("/api/v1/agents")["agents"]
            health = self.get_json("/health")
            traffic = self.get_json("/api/v1/traffic")
            models = self.get_json("/api/v1/models")["models"]
            tenants = self.tenants()
        except (requests.RequestException, ValueError, KeyError) as exc:
            self.call_from_thread(self.show_error, exc)
            return
        self.call_from_thread(self.show, agents, health, traffic, models, tenants)

    def tenants(self) -> list[dict[str, Any]]:
        """The tenants view, when the balancer has tenants (404 without --tenants)."""
        response = self.session.get(f"{self.management_url}/api/v1/tenants", timeout=2)
        return response.json()["tenants"] if response.status_code == 200 else []

    def get_json(self, path: str) -> dict[str, Any]:
        """A management API document; an error answer (a missing token, say) raises with its own message."""
        response = self.session.get(f"{self.management_url}{path}", timeout=2)
        body = response.json()
        if response.status_code >= 400 and path != "/health":  # /health answers 503 while shutting down
            raise ValueError(body.get("error", {}).get("message", f"HTTP {response.status_code}"))
        return body

    def set_columns(self, widths: dict[str, int]) -> None:
        table = self.query_one(DataTable)
        table.clear(columns=True)
        for column in COLUMNS:
            table.add_column(column, width=widths[column], key=column)
        self.widths = widths

    def show(self, agents: list[dict[str, Any]], health: dict[str, Any], traffic: dict[str, Any],
             models: list[dict[str, Any]] | None = None, tenants: list[dict[str, Any]] | None = None) -> None:
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        figures = {server["addr"]: server for server in traffic["servers"]}
        rows = [row_for(agent, figures.get(agent["external_llamacpp_addr"])) for agent in agents]
        widths = column_widths(rows)
        if widths != self.widths:
            self.set_columns(widths)
        table.clear()
        for agent, row in zip(agents, rows, strict=True):
            table.add_row(*row, key=agent["agent_id"])
        if agents:
            table.move_cursor(row=min(cursor, len(agents) - 1))
        self.agents = {agent["agent_id"]: agent for agent in agents}
        self.figures = figures
        self._set_message("" if agents else EMPTY)
        self.show_detail()
        totals = totals_text(health, traffic)
        if models:
            totals += "\n" + models_text(models)
        if tenants:
            totals += "\n" + tenants_text(tenants)
        self.query_one("#totals", Static).update(Text(totals))

    def show_detail(self) -> None:
        table = self.query_one(DataTable)
        agent = None
        if table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            agent = self.agents.get(key) if key is not None else None
        figures = self.figures.get(agent["external_llamacpp_addr"]) if agent else None
        self.query_one("#detail", Static).update(Text(detail_text(agent, figures) if agent else ""))

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self.show_detail()

    def show_error(self, exc: Exception) -> None:
        reason = str(exc) if type(exc) is ValueError and str(exc) else type(exc).__name__
        self._set_message(f"Cannot reach the balancer at {self.management_url}: {reason}. "
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
