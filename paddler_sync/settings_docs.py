"""The settings' documentation, generated from their one declaration (paddler_sync/settings.py): the README's
settings table and the example config files in ``conf/``. Tests keep both in step with the code.

    python -m paddler_sync.settings_docs table          # print the README's table
    python -m paddler_sync.settings_docs conf balancer  # print conf/balancer.conf
    python -m paddler_sync.settings_docs write          # rewrite conf/*.conf and the README's table
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

from paddler_sync.settings import ALL, ENV_PREFIX, SETTINGS, Setting, settings_for

CONF_COMMANDS = ("balancer", "agent")
CONF_WIDTH = 110


def docs_default(setting: Setting) -> str:
    if setting.docs_default is not None:
        return setting.docs_default
    if setting.switch:
        return "on" if setting.default else "off"
    if setting.default is None:
        return "unset"
    if isinstance(setting.default, float) and setting.default.is_integer():
        return str(int(setting.default))
    return str(setting.default)


def markdown_table() -> str:
    """The README's settings table."""
    lines = ["| setting | environment | commands | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        flag = f"`{s.flag}`" if not s.switch else f"`{s.flag}` / `--no-{s.name}`"
        if s.aliases:
            flag += " (also " + ", ".join(f"`{a}`" for a in s.aliases) + ")"
        commands = ", ".join(s.commands) if s.commands != ALL else "all"
        lines.append(f"| {flag} | `{s.env}` | {commands} | `{docs_default(s)}` | {s.help} |")
    return "\n".join(lines)


def conf_value(setting: Setting) -> str:
    """A setting's default as a config file writes it (an unset one: nothing after the '=')."""
    if setting.switch:
        return "true" if setting.default else "false"
    return "" if setting.default is None else docs_default(setting)


def conf_file(command: str) -> str:
    """``conf/COMMAND.conf``: every setting of the command, commented out at its default, with its help."""
    lines = [f"# paddler-sync {command} settings. Every line is optional; each shows its setting's default",
             "# (an empty value: unset). Generated from paddler_sync/settings.py by",
             "# `python -m paddler_sync.settings_docs write` (a test keeps it true to the code).",
             f"# Precedence: defaults < this file < {ENV_PREFIX}* environment variables < command line.",
             f"# Read from conf/{command}.conf below the working directory, or the file given by --config / "
             f"{ENV_PREFIX}CONFIG."]
    for setting in settings_for(command):
        lines.append("")
        lines += textwrap.wrap(setting.help, CONF_WIDTH - 2, initial_indent="# ", subsequent_indent="# ")
        lines.append(f"# {setting.name} = {conf_value(setting)}".rstrip())
    return "\n".join(lines) + "\n"


def write_conf_files(folder: Path) -> None:
    for command in CONF_COMMANDS:
        (folder / f"{command}.conf").write_text(conf_file(command))


def write_readme_table(readme: Path) -> None:
    """The table between the README's ``<!-- settings:start -->`` and ``<!-- settings:end -->`` markers."""
    text = readme.read_text()
    table = markdown_table()
    readme.write_text(re.sub(r"(<!-- settings:start -->\n).*?(\n<!-- settings:end -->)",
                             lambda m: m.group(1) + table + m.group(2), text, flags=re.S))


def main(argv: list[str]) -> int:
    if argv[:1] == ["table"]:
        print(markdown_table())
    elif argv[:1] == ["conf"] and len(argv) == 2:
        sys.stdout.write(conf_file(argv[1]))
    elif argv[:1] == ["write"]:
        write_conf_files(Path("conf"))
        write_readme_table(Path("README.md"))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover - a maintainer's command
    sys.exit(main(sys.argv[1:]))
