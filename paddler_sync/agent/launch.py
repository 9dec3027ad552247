"""The llama-server command line a supervising agent runs, and how a desired state changes it.

The operator gives one command (``--supervise -- llama-server -m tiny.gguf -np 4``). The agent fixes
where it listens once, at start (its ``--host``/``--port``, or a free port it picks), because the
balancer knows the server by that address: every command it runs later listens there too. A desired
state changes the rest: ``args`` replace everything after the executable, ``model`` replaces ``-m``.
The program itself (the words before the first option) never changes: the management API may choose a
model and options, not a program to run.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from paddler_sync.addresses import Address

logger = logging.getLogger("paddler_sync.agent.launch")
MODEL_OPTIONS = ("-m", "--model")
ADDRESS_OPTIONS = ("--host", "--port")
HELP_TIMEOUT_SECONDS = 20.0
MONITORING_FLAGS = (("--slots", "--no-slots"), ("--metrics", "--no-metrics"))


def option_value(argv: Sequence[str], names: Sequence[str]) -> str | None:
    """The value of the last ``NAME VALUE`` or ``NAME=VALUE`` among ``argv`` (as llama-server reads it)."""
    found = None
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            found = argv[i + 1]
        elif "=" in arg and arg.split("=", 1)[0] in names:
            found = arg.split("=", 1)[1]
    return found


def without_options(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``argv`` without these options and their values."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not ("=" in arg and arg.split("=", 1)[0] in names):
            kept.append(arg)
    return kept


def with_model(args: Sequence[str], model: str) -> list[str]:
    return [*without_options(args, MODEL_OPTIONS), "-m", model]


def program(argv: Sequence[str]) -> list[str]:
    """The command's words before its first option (``llama-server``, ``paddler-sync simulate``, ``python -m
    paddler_sync simulate``): what a desired state never changes."""
    start = 3 if len(argv) > 2 and os.path.basename(argv[0]).startswith("python") and argv[1] == "-m" else 0
    words = list(argv[:start])
    for arg in argv[start:]:
        if arg.startswith("-"):
            break
        words.append(arg)
    return words


def help_argv(argv: Sequence[str]) -> list[str]:
    """How to ask this command for its flags (``llama-server --help``, ``paddler-sync simulate --help``)."""
    return [*program(argv), "--help"]


def supported_flags(argv: Sequence[str]) -> str:
    """The command's --help text ('' when it has none): which monitoring flags this build takes."""
    try:
        done = subprocess.run(help_argv(argv), capture_output=True, text=True, timeout=HELP_TIMEOUT_SECONDS,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("could not read `%s`: %s; adding no flags", " ".join(help_argv(argv)), exc)
        return ""
    return done.stdout + done.stderr


def monitoring_flags(argv: Sequence[str], help_text: str) -> list[str]:
    """--slots (b4748 serves /slots only with it) and --metrics where the build's --help says they are off by
    default and the command says neither way: the agent reads /slots, the real-server checks read /metrics."""
    added = []
    for flag, negation in MONITORING_FLAGS:
        said = any(arg in (flag, negation) for arg in argv)
        if not said and _off_by_default(help_text, flag):
            added.append(flag)
    return added


def _off_by_default(help_text: str, flag: str) -> bool:
    """llama-server's help line for the flag: ``--slots   enable slots monitoring endpoint (default: disabled)``."""
    return any(flag in (word.strip(",") for word in line.split()[:3]) and "default: disabled" in line
               for line in help_text.splitlines())


def free_port(host: str) -> int:
    """A port nothing listens on now, for a llama-server started without --port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class CommandLine:
    """The operator's command, where it listens, and the flags the agent adds to every command it runs."""

    base: tuple[str, ...]
    listen: Address
    added: tuple[str, ...] = ()

    @classmethod
    def prepare(cls, argv: Sequence[str]) -> CommandLine:
        """Fix the address once; learn from --help which monitoring flags this build needs."""
        host = option_value(argv, ("--host",)) or "127.0.0.1"
        port_text = option_value(argv, ("--port",))
        port = int(port_text) if port_text and port_text.isdigit() else free_port(host)
        return cls(tuple(argv), Address(host, port), tuple(monitoring_flags(argv, supported_flags(argv))))

    def argv(self, model: str | None = None, args: Sequence[str] | None = None) -> list[str]:
        """The command to run: the operator's, or its program with ``args``, with ``model`` as its -m; always
        listening where the first one did."""
        words = program(self.base)
        rest = list(self.base[len(words):]) if args is None else list(args)
        if model is not None:
            rest = with_model(rest, model)
        rest = without_options(rest, ADDRESS_OPTIONS)
        flags = [f for f in self.added if f not in rest]
        return [*words, *rest, *flags, "--host", self.listen.host, "--port", str(self.listen.port)]

    @property
    def model(self) -> str | None:
        return option_value(self.base, MODEL_OPTIONS)
