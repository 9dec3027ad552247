"""The shape of one setting, and the sections the documentation and ``--help`` group them in. The declarations
themselves are in paddler_sync/settings.py (and the simulator's in paddler_sync/simulator/settings.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from paddler_sync.setting_errors import ENV_PREFIX
from paddler_sync.setting_values import text_value


@dataclass(frozen=True)
class Setting:
    """One setting. ``switch`` settings are booleans with ``--name`` / ``--no-name``."""

    name: str
    help: str
    commands: tuple[str, ...]
    parse: Callable[[str], Any] = text_value
    default: Any = None
    switch: bool = False
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    secret: bool = False
    docs_default: str | None = None
    section: str = ""

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


B, A, D, S = ("balancer",), ("agent",), ("dashboard",), ("simulate",)
ALL = ("balancer", "agent", "dashboard", "simulate")


def section(title: str, settings: Iterable[Setting]) -> tuple[Setting, ...]:
    """These settings, under one heading of the settings reference and of ``--help``."""
    return tuple(replace(setting, section=title) for setting in settings)
