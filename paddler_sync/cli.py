"""``paddler-sync agent | balancer | dashboard | simulate``: dispatch by hand, one flat parser each.

configargparse mis-routes config and environment values between subparsers, so each command gets
its own parser (values given in a config file or the environment for one subcommand reached
another's). Gevent commands patch the standard
library here, before anything that opens sockets is imported; the dashboard never patches.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from paddler_sync import __version__

USAGE = """usage: paddler-sync COMMAND [options]

commands:
  balancer   balance requests over llama.cpp servers by their free slots
  agent      watch one llama.cpp server and report its slots to the balancer
  dashboard  show the fleet in the terminal
  simulate   run a simulated llama.cpp server

'paddler-sync COMMAND --help' lists a command's settings.
"""

# The balancer is patched by its gunicorn worker, never in the master (the arbiter stays plain).
GEVENT_COMMANDS = ("agent", "simulate")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        sys.exit(0 if args else 2)
    if args[0] in ("-V", "--version"):
        sys.stdout.write(f"paddler-sync {__version__}\n")
        sys.exit(0)
    command, rest = args[0], args[1:]
    runner = _runner(command)
    if command == "agent":
        rest = supervised_command(rest)
    if command in GEVENT_COMMANDS:
        from paddler_sync.patching import patch

        patch()
    from paddler_sync.logs import setup_logging
    from paddler_sync.settings import parse_settings

    options = parse_settings(command, rest)
    setup_logging(options.log_level)
    sys.exit(runner()(options))


def supervised_command(args: list[str]) -> list[str]:
    """``--supervise -- llama-server -m x.gguf`` (the command last, as typed) becomes one setting value,
    ``--supervise=llama-server -m x.gguf``, the same as a config file's or the environment's."""
    import shlex

    if "--" not in args:
        return args
    split = args.index("--")
    head, command = args[:split], args[split + 1:]
    if "--supervise" not in head or not command:
        sys.stderr.write("paddler-sync agent: error: a command after -- needs --supervise before it, e.g. "
                         "paddler-sync agent --supervise -- llama-server -m model.gguf -np 4\n")
        sys.exit(2)
    at = head.index("--supervise")
    return [*head[:at], f"--supervise={shlex.join(command)}", *head[at + 1:]]


def _runner(command: str) -> Callable[[], Callable]:
    """Look up a command without importing it (imports must wait for the patch)."""

    def balancer() -> Callable:
        from paddler_sync.server import run_balancer

        return run_balancer

    def agent() -> Callable:
        from paddler_sync.agent.main import run_agent

        return run_agent

    def dashboard() -> Callable:
        from paddler_sync.tui import run_dashboard

        return run_dashboard

    def simulate() -> Callable:
        from paddler_sync.simulator.server import run_simulator

        return run_simulator

    runners = {"balancer": balancer, "agent": agent, "dashboard": dashboard, "simulate": simulate}
    if command not in runners:
        sys.stderr.write(f"paddler-sync: error: unknown command '{command}': expected one of "
                         f"{', '.join(runners)}\n")
        sys.exit(2)
    return runners[command]
