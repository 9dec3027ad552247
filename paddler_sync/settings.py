"""Every setting of every command, declared once.

One declaration (name, parser, default, help, commands, section) feeds the command line and its ``--help``, the
config files, the ``PADDLER_*`` environment variables and the settings reference (docs/reference/settings.md), so
they can never disagree. Precedence: defaults < config file < environment < command line (configargparse's own).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

import configargparse

from paddler_sync.addresses import parse_address
from paddler_sync.setting_errors import ENV_PREFIX, check_environment, unknown_key, unrecognized
from paddler_sync.setting_spec import ALL, A, B, D, Setting, section
from paddler_sync.setting_values import (
    address,
    bounded_count,
    byte_size,
    choice,
    command_line,
    count,
    duration,
    labels,
    log_level,
    name,
    networks,
    path_prefix,
    positive_count,
    positive_duration,
    state_backend,
    tenants_file,
    text_value,
)
from paddler_sync.simulator.settings import SIMULATOR_SETTINGS

SETTINGS: tuple[Setting, ...] = (
    *section("Every command", (
        Setting("log-level", "Log verbosity: debug, info, warning, error or critical.", ALL, log_level, "info"),
        Setting("management-addr", "Balancer: where the management server (agent reports, /api/v1/agents, "
                "/health, dashboard) listens. Agent and dashboard: where to reach it.",
                B + A + D, address, parse_address("127.0.0.1:8085"), metavar="HOST:PORT"),
        Setting("management-path-prefix", "Also serve the management API under this path of the proxy port (e.g. "
                "/_paddler), for platforms that route one port only; agents and the dashboard then use the proxy "
                "address as --management-addr with the same prefix. Anyone who reaches the proxy reaches it too.",
                B + A + D, path_prefix, None, metavar="PATH"),
        Setting("management-token", "Shared secret of the management plane. Agents send it with every report; when "
                "set, the balancer refuses reports without it and also requires it (or the read-only token) for "
                "/api/v1/agents, /metrics and the dashboard. /health stays open.", B + A + D, text_value, None,
                secret=True, metavar="TOKEN"),
    )),
    *section("Balancer: listening and workers", (
        Setting("reverseproxy-addr", "Where the reverse proxy listens for llama.cpp clients (under a bare "
                "gunicorn command line, gunicorn's own bind wins).", B, address, parse_address("127.0.0.1:8080"),
                metavar="HOST:PORT"),
        Setting("workers", "gunicorn worker processes of paddler-sync balancer (and conf/gunicorn.conf.py); more "
                "than 1 needs a Redis --state-backend.", B, positive_count, 1),
        Setting("max-client-connections", "Most client connections the balancer holds at once, waiting ones "
                "included (gunicorn's --worker-connections).", B, positive_count, 4096),
        Setting("graceful-timeout", "On SIGTERM: how long responses in flight may run on before they are cut "
                "(waiting requests get 503 at once). Under a bare gunicorn command line, gunicorn's own "
                "--graceful-timeout applies.", B, duration, 30.0, metavar="SECONDS"),
        Setting("max-request-body", "Largest request body the proxy forwards; larger ones get 413.", B,
                byte_size, 8 << 20, metavar="BYTES", docs_default="8m"),
        Setting("max-request-line", "Longest request line (method, path and query) the proxy reads; longer ones "
                "get 414. At most 8190. Under a bare gunicorn command line, gunicorn's --limit-request-line applies.",
                B, bounded_count(1, 8190), 8190, metavar="BYTES"),
        Setting("max-header-size", "Largest single request header the proxy reads; larger ones get 431 "
                "(under a bare gunicorn command line, its --limit-request-field_size applies).", B,
                bounded_count(1, 65536), 8190, metavar="BYTES"),
        Setting("max-headers", "Most request headers the proxy reads; more get 431 (under a bare "
                "gunicorn command line, its --limit-request-fields applies).", B, bounded_count(1, 32768), 100),
    )),
    *section("Balancer: management plane", (
        Setting("management-read-token", "A second token that may only read: /api/v1/agents, /metrics and the "
                "dashboard (the dashboard command takes it as --management-token).", B, text_value, None, secret=True,
                metavar="TOKEN"),
        Setting("agent-allowed-networks", "Accept reports only for llama.cpp addresses in these networks, e.g. "
                "10.0.0.0/8,192.168.1.0/24 (host names must resolve inside them). Unset: any address.", B,
                networks, None, metavar="CIDRS"),
        Setting("management-dashboard-enable", "Serve the web dashboard at /dashboard on the management server.",
                B, default=False, switch=True),
        Setting("max-agents", "Most agents the balancer accepts; reports from more get 429.", B, positive_count, 1024),
        Setting("agent-missed-reports", "Drop an agent after this many of its reporting intervals pass without "
                "a report.", B, positive_count, 3),
        Setting("slots-endpoint-enable", "Let /slots through the proxy (it shows other users' prompts).",
                B, default=False, switch=True),
    )),
    *section("Balancer: buffering", (
        Setting("max-buffered-requests", "How many requests may wait for a free slot; more get 429. With --tenants, "
                "how many of each tenant's. 0 turns buffering off.", B, count, 30),
        Setting("buffered-request-timeout", "How long a request may wait for a free slot before it gets 504 "
                "(waiting only, never generation).", B, duration, 10.0, metavar="SECONDS"),
        Setting("per-model-queues", "One waiting queue per model, so a burst for one model never delays "
                "another's requests. --no-per-model-queues keeps one queue for all (the benchmarks' baseline).", B,
                default=True, switch=True),
        Setting("queue-updates", "Let a streaming request that must wait ask (header X-Paddler-Queue-Updates: 1) "
                "for its place in the queue and expected start, as SSE comment lines each second.", B, default=False,
                switch=True),
        Setting("early-dispatch", "Hand a waiting request to a full llama.cpp server this long (e.g. 10ms) "
                "before one of its requests is expected to end (from the request's n_predict / max_tokens and the "
                "server's measured time per token), so llama.cpp starts it in the very step the slot frees instead of "
                "after a round trip through the balancer. At most one request per server waits inside llama.cpp "
                "this way. 0: never (no request ever waits inside llama.cpp). In-process ledger only.", B,
                duration, 0.0, metavar="DURATION"),
    )),
    *section("Balancer: routing and models", (
        Setting("policy", "How to pick a server: first-token (among servers with a free slot, the one where the "
                "request's first token is expected soonest: the prompt's part its cache does not hold over its "
                "measured prefill speed), slots (the most free slots); both keep requests waiting in the balancer when "
                "no slot is free. The slot-blind round-robin and least-connections are kept for comparison "
                "benchmarks.", B,
                choice("first-token", "slots", "round-robin", "least-connections"), "first-token"),
        Setting("prefix-cache-entries", "First-token routing: how many prompt blocks (256 bytes each) the balancer "
                "remembers, in all, to know which server's cache holds a prompt's prefix (least recently used first "
                "out; about 150 bytes each).", B, positive_count, 200_000),
        Setting("default-model", "The model of a request that names none (its body has no 'model', a GET no "
                "?model=). Unset: such a request goes to any server that serves one model.", B, text_value, None,
                metavar="MODEL"),
        Setting("buffer-unknown-models", "Let a request for a model no server serves wait in the buffer "
                "(scale from zero: its servers are still starting) instead of answering 404 at once.", B,
                default=False, switch=True),
        Setting("models-autoload", "Send a request for a model that is loaded nowhere to a llama.cpp router "
                "(2026 builds) that can load it, rather than letting it wait. A router started with "
                "--no-models-autoload is never asked.", B, default=True, switch=True),
        Setting("models-discovery-time", "For this long after start, a request for a model no agent has "
                "reported yet waits (up to this long) for the agents' first reports before it gets 404; at least the "
                "agents' --monitoring-interval.", B, duration, 5.0, metavar="SECONDS"),
        Setting("context-check", "How a request's size meets the slots' context. prompt (llama.cpp's rule): send "
                "it only where its prompt fits, and a prompt that fits no slot to the largest, whose llama.cpp answers "
                "as it would directly; prompt-and-limit (OpenAI's rule): answer 400 context_length_exceeded up front "
                "when the prompt plus max_tokens / n_predict fits no slot; off: ignore context.", B,
                choice("prompt", "prompt-and-limit", "off"), "prompt"),
    )),
    *section("Balancer: connections to llama.cpp", (
        Setting("upstream-connect-timeout", "Connect timeout towards a llama.cpp server; a server that does not "
                "accept in time is quarantined.", B, positive_duration, 3.0, metavar="SECONDS"),
        Setting("upstream-read-timeout", "Longest silence allowed from a llama.cpp server while it answers "
                "(prompt processing included).", B, positive_duration, 600.0, metavar="SECONDS"),
        Setting("upstream-pool-size", "Idle connections kept open to each llama.cpp server. Each one pins one "
                "of llama.cpp's HTTP threads (--threads-http, a few more than its slots): keep it at most the "
                "slot count.", B, positive_count, 4),
        Setting("upstream-idle-timeout", "Close a pooled connection to llama.cpp once it has been idle this long. "
                "llama.cpp closes kept-alive connections after 5 s idle (sooner when its HTTP threads run out), and a "
                "request written on a connection it just closed is sent again on a fresh one: keep this below 5 s.",
                B, positive_duration, 2.0, metavar="SECONDS"),
        Setting("quarantine-duration", "How long a server that refused a connection gets no traffic, unless its "
                "agent reports it healthy after that.", B, positive_duration, 10.0, metavar="SECONDS"),
        Setting("rewrite-host-header", "Send the chosen llama.cpp address as the upstream Host header "
                "instead of the client's.", B, default=False, switch=True),
        Setting("upstream-api-key", "The key the llama.cpp servers were started with (llama-server --api-key), sent "
                "as 'Authorization: Bearer KEY' on the requests the balancer forwards when --tenants is set (the "
                "clients' own keys stay at the balancer).", B, text_value, None, secret=True, metavar="KEY"),
    )),
    *section("Balancer: tenants", (
        Setting("tenants", "A TOML file of tenants (client keys, priorities, weights, reserved and maximum slots, "
                "requests and tokens per minute, models): requests then need a tenant's key, which is never passed "
                "to llama.cpp, and slots are shared by the tenant rule (see Tenants). Reloaded on SIGHUP and on PUT "
                "/api/v1/tenants. Unset: no keys, one queue order, Authorization passed through.", B, tenants_file,
                None, metavar="PATH"),
    )),
    *section("Balancer: shared ledger (Redis)", (
        Setting("state-backend", "Where the slot ledger lives: local (in this process; one gunicorn worker), a "
                "Redis URL such as redis://127.0.0.1:6379/0, Sentinels and the master they name, "
                "redis+sentinel://HOST:PORT,HOST:PORT/MASTER_NAME, or nodes of a Redis Cluster, "
                "redis+cluster://HOST:PORT,HOST:PORT; shared by many workers and balancers. While Redis is "
                "unreachable (a failover), requests that need a slot wait for it in the buffer.", B, state_backend,
                "local", metavar="local|URL"),
        Setting("state-prefix", "Prefix of the balancer's keys in Redis; balancers that share a prefix share a "
                "fleet.", B, name, "paddler"),
        Setting("lease-ttl", "With Redis: a slot taken by a balancer that stops renewing it (it died) returns "
                "after this long.", B, positive_duration, 15.0, metavar="SECONDS"),
    )),
    *section("Model swaps and drains", (
        Setting("max-unavailable", "A fleet-wide desired state (PUT /api/v1/desired_state) swaps at most this many "
                "servers at once: each drains, restarts and loads before the next begins.", B, positive_count, 1),
        Setting("drain-timeout", "Balancer: how long a server's requests in flight may run on when it drains for a "
                "swap of its model; then llama-server restarts anyway and they end with an error event. Agent: the "
                "same limit when the agent stops (SIGTERM).", B + A, duration, 60.0, metavar="SECONDS"),
    )),
    *section("Balancer: StatsD", (
        Setting("statsd-addr", "Send StatsD metrics to this UDP address (off when unset).", B, address, None,
                metavar="HOST:PORT"),
        Setting("statsd-prefix", "Prefix of every StatsD metric.", B, name, "paddler"),
        Setting("statsd-reporting-interval", "How often to send the StatsD gauges.", B, positive_duration, 10.0,
                metavar="SECONDS"),
    )),
    *section("Agent", (
        Setting("local-llamacpp-addr", "The llama.cpp server this agent watches (polls /slots and /props). "
                "aws:metadata:local-ipv4[:PORT] takes the EC2 instance's private IPv4.", A, address,
                parse_address("127.0.0.1:8081"), metavar="HOST:PORT"),
        Setting("external-llamacpp-addr", "The address the balancer sends requests to (default: the local "
                "address). Accepts aws:metadata:local-ipv4[:PORT] too.", A, address, None, metavar="HOST:PORT"),
        Setting("llamacpp-api-key", "The llama.cpp API key, sent as a Bearer token on the agent's own polls.",
                A, text_value, None, aliases=("--local-llamacpp-api-key",), secret=True, metavar="KEY"),
        Setting("monitoring-interval", "How often the agent polls llama.cpp and reports to the balancer.",
                A, positive_duration, 1.0, metavar="SECONDS"),
        Setting("llamacpp-timeout", "Timeout of each poll of llama.cpp; a slower answer counts as unreachable.",
                A, positive_duration, 3.0, metavar="SECONDS"),
        Setting("llamacpp-sleep-idle-seconds", "The --sleep-idle-seconds llama-server was started with (2026 builds "
                "unload the model after that long idle). Every /slots poll would wake it, so the agent then reads "
                "/props each interval and /slots only while the server is busy or once per idle period, and reports "
                "it sleeping; the balancer sends it a request only when no awake server has a free slot. 0: the "
                "server never sleeps.", A, duration, 0.0, metavar="SECONDS"),
        Setting("name", "A display name for this agent in the API and dashboards.", A, name, None),
        Setting("label", "This server's labels, e.g. gpu=a100,zone=eu: fleet-wide desired states select by them.", A,
                labels, None, metavar="LABELS"),
        Setting("aws-metadata-endpoint", "EC2 instance metadata service (IMDSv2) used to resolve "
                "aws:metadata:local-ipv4.", A, text_value, "http://169.254.169.254", metavar="URL"),
    )),
    *section("Agent: supervision", (
        Setting("supervise", "Run llama-server as the agent's child and keep it running: restart it when it exits or "
                "stops answering, swap its model when the balancer asks. On the command line put it last: --supervise "
                "-- llama-server -m model.gguf -np 4 (without --port the agent picks a free one; it adds --slots and "
                "--metrics where the build takes them). In a config file: supervise = llama-server -m model.gguf.",
                A, command_line, None, metavar="COMMAND"),
        Setting("supervise-log-level", "The level of llama-server's output lines in the agent's log "
                "([llama-server PID] …).", A, log_level, "info"),
        Setting("supervise-max-restarts", "Give up restarting after this many failed starts in a row (state crashed, "
                "until a new desired state or an agent restart); 0: never give up.", A, count, 10),
        Setting("supervise-backoff", "After a failure llama-server restarts at once; after a second in a row, this "
                "long later, doubling with each failure.", A, positive_duration, 1.0, metavar="SECONDS"),
        Setting("supervise-backoff-max", "The longest wait between restarts.", A, positive_duration, 60.0,
                metavar="SECONDS"),
        Setting("supervise-start-timeout", "A started llama-server that is not ready (model loaded, slots seen) within "
                "this long is stopped and counts as a failed start.", A, positive_duration, 300.0, metavar="SECONDS"),
        Setting("supervise-unresponsive-timeout", "Kill and restart a ready llama-server silent this long.", A,
                positive_duration, 30.0, metavar="SECONDS"),
        Setting("supervise-stop-timeout", "SIGKILL llama-server this long after SIGTERM.", A, positive_duration, 10.0),
    )),
    *section("Dashboard", (
        Setting("refresh-interval", "How often the terminal dashboard refreshes.", D, positive_duration, 0.5,
                metavar="SECONDS"),
    )),
    *SIMULATOR_SETTINGS,
)


def settings_for(command: str) -> list[Setting]:
    return [s for s in SETTINGS if command in s.commands]


# --- parser ---------------------------------------------------------------------------------------


class ConfFileParser(configargparse.DefaultConfigFileParser):
    """``key = value`` lines, checked as they are read: an unknown key is named with its file, its line and
    the setting it most likely meant; every key remembers where it came from, for later errors.

    ``max_buffered_requests`` is read as ``max-buffered-requests`` (both spellings are natural in a file).
    """

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command
        self.known = {name.removeprefix("--") for s in settings_for(command) for name in (s.flag, *s.aliases)}
        self.known.add("config")
        self.origins: dict[str, str] = {}

    def parse(self, stream: Any) -> dict[str, Any]:
        source = getattr(stream, "name", "the config file")
        items: dict[str, Any] = {}
        for number, line in enumerate(stream, start=1):
            for key, value in super().parse([line]).items():
                canonical = key.removeprefix("--").replace("_", "-")
                if canonical not in self.known:
                    raise configargparse.ConfigFileParserException(
                        unknown_key(self.command, self.known, key, f"{source} line {number}", SETTINGS))
                items[canonical] = value
                self.origins[canonical] = f"{source} line {number}"
        return items


class SettingsParser(configargparse.ArgumentParser):
    """A flat parser for one command whose errors are one line, naming the setting and its source."""

    def __init__(self, command: str, **kwargs: Any) -> None:
        self.command = command
        self.conf_files = ConfFileParser(command)
        super().__init__(config_file_parser_class=self.conf_files, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            message = unrecognized(self.command, message.removeprefix("unrecognized arguments: ").split(), SETTINGS)
        sys.stderr.write(f"paddler-sync {self.command}: error: {message}{self._source_hint(message)}\n")
        sys.exit(2)

    def _source_hint(self, message: str) -> str:
        """Tell where a bad value came from when it was not typed on the command line."""
        for setting in settings_for(self.command):
            names = (setting.flag, *setting.aliases)
            if not any(f"argument {n}" in message.split(":")[0] for n in names):
                continue
            if any(arg.split("=")[0] in names for arg in self._cli_args):
                return ""
            if setting.env in os.environ:
                return f" (from the environment variable {setting.env})"
            origin = self.conf_files.origins.get(setting.name, "the config file")
            return f" (from {origin})"
        return ""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None,
                         **kwargs: Any) -> Any:
        self._cli_args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args=args, namespace=namespace, **kwargs)


def default_config_files(command: str) -> list[str]:
    """``conf/<command>.conf`` below the working directory, when it exists."""
    return [os.path.join("conf", f"{command}.conf")]


def build_parser(command: str, config_files: Iterable[str] | None = None) -> SettingsParser:
    parser = SettingsParser(
        command,
        prog=f"paddler-sync {command}",
        description=COMMAND_HELP[command],
        default_config_files=list(default_config_files(command) if config_files is None else config_files),
        add_env_var_help=False,
        add_config_file_help=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", is_config_file=True, env_var=ENV_PREFIX + "CONFIG", metavar="FILE",
                        help=f"Read settings from FILE (key = value lines) instead of conf/{command}.conf.")
    groups: dict[str, Any] = {}
    for setting in settings_for(command):  # --help shows them under the settings reference's headings
        if setting.section not in groups:
            groups[setting.section] = parser.add_argument_group(setting.section or None)
        _add(groups[setting.section], setting)
    return parser


def _add(parser: Any, setting: Setting) -> None:
    help_text = f"{setting.help} [env {setting.env}]"
    if setting.switch:
        parser.add_argument(setting.flag, *setting.aliases, dest=setting.dest, env_var=setting.env,
                            action=argparse.BooleanOptionalAction, default=setting.default, help=help_text)
        return
    parser.add_argument(setting.flag, *setting.aliases, dest=setting.dest, env_var=setting.env,
                        type=setting.parse, default=setting.default, help=help_text,
                        metavar=setting.metavar or setting.dest.upper())


def parse_settings(command: str, args: Sequence[str] | None = None,
                   config_files: Iterable[str] | None = None) -> argparse.Namespace:
    """Parse one command's settings; a bad value exits with status 2 and one line on stderr."""
    parser = build_parser(command, config_files)
    options = parser.parse_args(args=args)
    check_environment(command, dict(os.environ), SETTINGS)
    options.command = command
    options.argv = list(args) if args is not None else sys.argv[1:]  # to read them again on a reload
    return options


COMMAND_HELP = {
    "balancer": "Balance requests over llama.cpp servers by their free slots; serve the management API.",
    "agent": "Watch one llama.cpp server's slots and report them to the balancer.",
    "dashboard": "Show the fleet in the terminal.",
    "simulate": "Run a simulated llama.cpp server (same API, slots that really queue).",
}
