"""The settings' documentation, generated from their one declaration (paddler_sync/settings.py): the settings
reference page of the documentation (docs/reference/settings.md, one table per section, as ``--help`` groups them)
and the example config files in ``conf/``. Tests keep both in step with the code.

    python -m paddler_sync.settings_docs page           # print the settings reference page
    python -m paddler_sync.settings_docs conf balancer  # print conf/balancer.conf
    python -m paddler_sync.settings_docs write          # rewrite conf/*.conf and docs/reference/settings.md
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from paddler_sync.settings import ALL, ENV_PREFIX, SETTINGS, Setting, settings_for

CONF_COMMANDS = ("balancer", "agent")
SETTINGS_PAGE = Path("docs/reference/settings.md")
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


def markdown_table(settings: list[Setting]) -> str:
    """One section's table."""
    lines = ["| setting | environment | commands | default | meaning |", "|---|---|---|---|---|"]
    for s in settings:
        flag = f"`{s.flag}`" if not s.switch else f"`{s.flag}` / `--no-{s.name}`"
        if s.aliases:
            flag += " (also " + ", ".join(f"`{a}`" for a in s.aliases) + ")"
        commands = ", ".join(s.commands) if s.commands != ALL else "all"
        lines.append(f"| {flag} | `{s.env}` | {commands} | `{docs_default(s)}` | {s.help} |")
    return "\n".join(lines)


def settings_page() -> str:
    """docs/reference/settings.md: every setting, one table per section."""
    sections: dict[str, list[Setting]] = {}
    for setting in SETTINGS:
        sections.setdefault(setting.section, []).append(setting)
    parts = [PAGE_HEAD]
    for title, settings in sections.items():
        parts.append(f"## {title}\n\n{markdown_table(settings)}\n")
    return "\n".join(parts)


PAGE_HEAD = f"""# Settings

<!-- Generated from paddler_sync/settings.py by `python -m paddler_sync.settings_docs write`; a test keeps it
true to the code. Edit the declarations, not this page. -->

Every setting has three spellings: a command-line flag, a `{ENV_PREFIX}*` environment variable, and a line of a
config file (`name = value`, read from `conf/COMMAND.conf` below the working directory or from `--config FILE`).
Precedence: defaults < config file < environment < command line. `paddler-sync COMMAND --help` lists the same
settings under the same headings. A wrong value stops the command with one line naming the setting, where it came
from and what it expects.
"""


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
    section = None
    for setting in settings_for(command):
        if setting.section != section:
            section = setting.section
            lines += ["", f"# --- {section} ---"]
        lines.append("")
        lines += textwrap.wrap(setting.help, CONF_WIDTH - 2, initial_indent="# ", subsequent_indent="# ")
        lines.append(f"# {setting.name} = {conf_value(setting)}".rstrip())
    return "\n".join(lines) + "\n"


def write_conf_files(folder: Path) -> None:
    for command in CONF_COMMANDS:
        (folder / f"{command}.conf").write_text(conf_file(command))


def write_settings_page(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(settings_page())


def main(argv: list[str]) -> int:
    if argv[:1] == ["page"]:
        sys.stdout.write(settings_page())
    elif argv[:1] == ["conf"] and len(argv) == 2:
        sys.stdout.write(conf_file(argv[1]))
    elif argv[:1] == ["write"]:
        write_conf_files(Path("conf"))
        write_settings_page(SETTINGS_PAGE)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover - a maintainer's command
    sys.exit(main(sys.argv[1:]))
