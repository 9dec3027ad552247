"""The value parsers of the settings: each turns one text into a value, or raises ArgumentTypeError saying
what was expected (argparse prints it with the setting's name and where the text came from)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from paddler_sync.addresses import Address, AddressError, parse_address

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def address(text: str) -> Address:
    try:
        return parse_address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def duration(text: str) -> float:
    """Seconds, as ``10``, ``0.5``, ``10s`` or ``250ms``."""
    raw = text.strip().lower()
    scale = 1.0
    if raw.endswith("ms"):
        raw, scale = raw[:-2], 0.001
    elif raw.endswith("s"):
        raw = raw[:-1]
    try:
        value = float(raw) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a duration: expected seconds such as 10, 0.5, 10s or 250ms")
    return value


def positive_duration(text: str) -> float:
    value = duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be more than 0 seconds")
    return value


def _integer(text: str, low: int, what: str, high: int | None = None) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise argparse.ArgumentTypeError(f"'{text}' is not {what}: expected a whole number {bound}")
    return value


def count(text: str) -> int:
    return _integer(text, 0, "a count")


def positive_count(text: str) -> int:
    return _integer(text, 1, "a positive count")


def bounded_count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _integer(text, low, "a count", high)
    parse.__name__ = "count"
    return parse


def byte_size(text: str) -> int:
    """Bytes, as ``1048576``, ``64k``, ``1m`` or ``1g`` (binary multiples)."""
    raw = text.strip().lower().removesuffix("b").removesuffix("i")
    multiplier = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(raw[-1:], 1)
    digits = raw[:-1] if multiplier > 1 else raw
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size: expected bytes such as 1048576, 64k or 1m")
    return int(digits) * multiplier


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a fraction: expected a number from 0 to 1")
    return value


def non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of 0 or more")
    return value


def name(text: str) -> str:
    if len(text) > 128 or any(ord(c) < 32 for c in text):
        raise argparse.ArgumentTypeError("a name has at most 128 printable characters")
    return text


def model_specs(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``tiny slow=fast,quick``: model ids separated by spaces, each with its aliases after '='."""
    specs = []
    for word in text.split():
        model_id, _, aliases = word.partition("=")
        names = tuple(a for a in aliases.split(",") if a)
        if not model_id or len(word) > 256 or any(ord(c) < 32 for c in word):
            raise argparse.ArgumentTypeError(f"'{word}' is not a model: expected ID or ID=ALIAS,ALIAS")
        specs.append((model_id, names))
    if not specs or len({s[0] for s in specs}) != len(specs):
        raise argparse.ArgumentTypeError("expected one or more distinct model ids, separated by spaces")
    return tuple(specs)


def state_backend(text: str) -> str:
    """``local``, a Redis URL (``redis://``, ``rediss://`` or ``unix://``), Sentinels and the master they name
    (``redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER_NAME``), or nodes of a Redis Cluster
    (``redis+cluster://HOST:PORT[,HOST:PORT...]``)."""
    from paddler_sync.ledger.stores.redis.connect import (
        CLUSTER_SCHEME,
        SENTINEL_SCHEME,
        RedisUrlError,
        parse_cluster_url,
        parse_sentinel_url,
    )

    value = text.strip()
    for scheme, parse, what in ((SENTINEL_SCHEME, parse_sentinel_url, "Sentinel"),
                                (CLUSTER_SCHEME, parse_cluster_url, "Redis Cluster")):
        if value.startswith(scheme):
            try:
                parse(value)
            except RedisUrlError as exc:
                raise argparse.ArgumentTypeError(f"'{text}' is not a {what} URL: {exc}") from None
            return value
    if value == "local" or (value.startswith(("redis://", "rediss://", "unix://")) and len(value) > 8):
        return value
    raise argparse.ArgumentTypeError(f"'{text}' is not a state backend: expected local, a Redis URL such as "
                                     f"redis://127.0.0.1:6379/0, redis+sentinel://HOST:PORT,HOST:PORT/MASTER_NAME "
                                     f"or redis+cluster://HOST:PORT,HOST:PORT")


def tenants_file(text: str) -> str:
    """A tenants file that loads: its errors (with the line) stop the start, not the first request."""
    from paddler_sync.tenants.book import TenantsError, load_tenants

    try:
        load_tenants(text.strip())
    except TenantsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a log level: expected one of {', '.join(LOG_LEVELS)}")
    return value


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise argparse.ArgumentTypeError(f"'{text}' is not one of {', '.join(options)}")
        return text

    parse.__name__ = "choice"
    return parse


def text_value(text: str) -> str:
    return text


def networks(text: str) -> tuple:
    import ipaddress

    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of networks: {exc}; expected e.g. "
                                         "10.0.0.0/8,192.168.1.0/24") from None


def command_line(text: str) -> tuple[str, ...]:
    """A command line as a shell would split it (``llama-server -m "my model.gguf" -np 4``)."""
    import shlex

    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not a command line: {exc}") from None
    if not argv:
        raise argparse.ArgumentTypeError("expected a command such as: llama-server -m model.gguf -np 4")
    return argv


LABEL = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"


def labels(text: str) -> dict[str, str]:
    """``gpu=a100,zone=eu``: a server's labels, which fleet-wide desired states select by."""
    import re

    found: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        key, equals, value = part.partition("=")
        if not part or not equals or not re.fullmatch(LABEL, key) or not re.fullmatch(LABEL, value):
            raise argparse.ArgumentTypeError(f"'{part}' is not a label: expected KEY=VALUE (letters, digits, "
                                             f"'.', '_', '-'), several separated by commas, e.g. gpu=a100,zone=eu")
        found[key] = value
    return found


def port(text: str) -> int:
    return _integer(text, 1, "a port", 65535)


def path_prefix(text: str) -> str:
    if not text.startswith("/") or text == "/" or text.endswith("/") or any(c in text for c in "?# "):
        raise argparse.ArgumentTypeError(f"'{text}' is not a path prefix: expected something like /_paddler")
    return text


# --- declarations -------------------------------------------------------------------------------


