"""What a mistyped setting gets: the setting it most likely meant, wherever it was typed (a flag, a config
file key, a ``PADDLER_*`` environment variable), or the command it belongs to. Pure: no I/O but the
message written before a start is refused."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Sequence
from typing import Protocol


class Setting(Protocol):
    """What these messages read of a setting (paddler_sync/settings.py declares them: it imports this module)."""

    @property
    def name(self) -> str: ...

    @property
    def commands(self) -> tuple[str, ...]: ...

    @property
    def switch(self) -> bool: ...

    @property
    def aliases(self) -> tuple[str, ...]: ...

    @property
    def flag(self) -> str: ...

    @property
    def env(self) -> str: ...

ENV_PREFIX = "PADDLER_"  # every setting's environment variable starts so (paddler_sync/settings.py takes it from here)
CUTOFF = 0.8  # difflib's ratio: a letter dropped, doubled or swapped in a name of ten or more


def closest(word: str, known: Iterable[str], prefix: str = "") -> str | None:
    """The known name most like ``word``, compared without their common ``prefix`` (which would make any two
    names look alike)."""
    stems = {name.removeprefix(prefix): name for name in known}
    found = difflib.get_close_matches(word.removeprefix(prefix), sorted(stems), n=1, cutoff=CUTOFF)
    return stems[found[0]] if found else None


def unknown_key(command: str, known: set[str], key: str, where: str, settings: Sequence[Setting]) -> str:
    """A config file's unknown key: the setting it meant, or the command it belongs to."""
    message = f"unknown setting `{key}` in {where}"
    canonical = key.removeprefix("--").replace("_", "-")
    elsewhere = [c for s in settings if s.name == canonical for c in s.commands]
    if elsewhere:
        return f"{message}: it is a setting of `paddler-sync {elsewhere[0]}`, not of `{command}`"
    guess = closest(canonical, known)
    if guess:
        return f"{message} (did you mean `{guess.replace('-', '_') if '_' in key else guess}`?)"
    return f"{message}: `paddler-sync {command} --help` lists every setting"


def unrecognized(command: str, words: list[str], settings: Sequence[Setting]) -> str:
    """argparse's "unrecognized arguments", each flag with the one it most likely meant (the values typed after
    a flag are left out: they are not the mistake)."""
    mine = [s for s in settings if command in s.commands]
    flags = {name for s in mine for name in (s.flag, *s.aliases)} | {"--config", "--help"}
    flags |= {f"--no-{s.name}" for s in mine if s.switch}
    named = [w for w in words if w.startswith("-")] or words
    parts = []
    for word in named:
        flag = word.split("=", 1)[0]
        elsewhere = [c for s in settings if flag in (s.flag, f"--no-{s.name}") for c in s.commands]
        guess = closest(flag, flags, "--") if flag.startswith("--") else None
        if elsewhere:
            parts.append(f"{word} (a setting of `paddler-sync {elsewhere[0]}`, not of `{command}`)")
        else:
            parts.append(f"{word} (did you mean {guess}?)" if guess else word)
    return (f"unrecognized argument{'s' if len(parts) > 1 else ''}: {', '.join(parts)}; "
            f"`paddler-sync {command} --help` lists every setting")


def check_environment(command: str, environ: dict[str, str], settings: Sequence[Setting]) -> None:
    """A ``PADDLER_*`` variable that is no setting would be silently ignored: one close to a setting's variable
    is most likely a typo and stops the start, naming the variable it meant; any other gets a warning."""
    known = {s.env for s in settings} | {ENV_PREFIX + "CONFIG"}
    for variable in sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in known):
        guess = closest(variable, known, ENV_PREFIX)
        if guess:
            sys.stderr.write(f"paddler-sync {command}: error: unknown environment variable {variable} "
                             f"(did you mean {guess}?)\n")
            sys.exit(2)
        sys.stderr.write(f"paddler-sync {command}: warning: the environment variable {variable} is no setting "
                         f"and is ignored (`paddler-sync {command} --help` names each setting's variable)\n")
