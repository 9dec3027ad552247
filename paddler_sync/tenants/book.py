"""The tenants file (``--tenants``): one TOML table per tenant, checked whole before it is used.

```toml
[tenants.chat]
keys = ["sk-chat-0001"]          # or key_sha256 = ["<hex>"]: keys need not sit in the file in clear
priority = 10
weight = 1
reserved_slots = 1
max_slots = 0
requests_per_minute = 0
tokens_per_minute = 0
models = ["*"]

[tenants.anonymous]              # optional: requests that carry no key
```

Keys are kept only as SHA-256 digests; :meth:`TenantBook.identify` compares a presented key's digest with every
tenant's, each comparison constant-time and none cut short, so the answer's timing says nothing about which
keys exist. A key never leaves this module but as :func:`key_prefix` (8 characters at most) and only for keys the
file holds in clear.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import hmac
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paddler_sync.tenants.rule import Share

ANONYMOUS = "anonymous"
PREFIX_SHOWN = 8
COUNTS = ("priority", "reserved_slots", "max_slots", "requests_per_minute", "tokens_per_minute")
FIELDS = ("keys", "key_sha256", "weight", "models", *COUNTS)
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class TenantsError(ValueError):
    """A tenants file that cannot be used; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Tenant:
    share: Share
    key_digests: tuple[bytes, ...] = ()
    key_prefixes: tuple[str, ...] = ()  # of the keys written in clear, for display
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    models: tuple[str, ...] = ("*",)

    @property
    def name(self) -> str:
        return self.share.name

    def may_use(self, model: str | None) -> bool:
        """``model``: normalized (lower case); None: the request names none, which only an unrestricted tenant
        may send (the balancer cannot tell which model will answer it)."""
        if "*" in self.models:
            return True
        return model is not None and any(fnmatch.fnmatchcase(model, glob) for glob in self.models)

    def describe(self) -> dict[str, Any]:
        """For the API and the dashboards: never a key, only prefixes of those in clear."""
        return {"name": self.name, "priority": self.share.priority, "weight": self.share.weight,
                "reserved_slots": self.share.reserved_slots, "max_slots": self.share.max_slots,
                "requests_per_minute": self.requests_per_minute, "tokens_per_minute": self.tokens_per_minute,
                "models": list(self.models), "keys": len(self.key_digests), "key_prefixes": list(self.key_prefixes)}


@dataclass(frozen=True)
class TenantBook:
    tenants: dict[str, Tenant] = field(default_factory=dict)
    source: str = ""

    @property
    def anonymous(self) -> Tenant | None:
        return self.tenants.get(ANONYMOUS)

    def identify(self, key: str | None) -> Tenant | None:
        """The tenant whose key this is (the anonymous one for no key), or None: unknown key, or no key and no
        anonymous tenant. Every digest is compared, in constant time each."""
        if not key:
            return self.anonymous
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for tenant in self.tenants.values():
            for known in tenant.key_digests:
                if hmac.compare_digest(digest, known):
                    found = tenant
        return found

    def shares_for(self, model: str | None) -> tuple[Share, ...]:
        """The tenants that may send a request for ``model``: the rivals of the rule on its servers (all of them
        for a request that names none)."""
        return tuple(t.share for t in self.tenants.values() if model is None or t.may_use(model))

    def all_shares(self) -> tuple[Share, ...]:
        return tuple(t.share for t in self.tenants.values())


def key_prefix(key: str) -> str:
    return key[:PREFIX_SHOWN] + "…" if len(key) > PREFIX_SHOWN else key[: PREFIX_SHOWN // 2] + "…"


def load_tenants(path: str | Path) -> TenantBook:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TenantsError(f"{path}: cannot read the tenants file ({exc.strerror}); check --tenants "
                           f"(PADDLER_TENANTS)") from None
    return parse_tenants(text, str(path))


def parse_tenants(text: str, source: str = "the tenants file") -> TenantBook:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TenantsError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"tenants"})
    if unknown:
        raise TenantsError(f"{source}, line {_line_of(text, unknown[0])}: unknown table or key {unknown[0]!r}; "
                           f"every tenant is a table [tenants.NAME]")
    tables = data.get("tenants", {})
    if not isinstance(tables, dict) or not tables:
        raise TenantsError(f"{source}: no tenant: add a table such as [tenants.chat] with keys = [\"...\"]")
    tenants = {name: _tenant(name, table, text, source) for name, table in tables.items()}
    _check_unique_keys(tenants, text, source)
    return TenantBook(tenants, source)


def _tenant(name: str, table: Any, text: str, source: str) -> Tenant:
    def fail(key: str | None, message: str) -> TenantsError:
        return TenantsError(f"{source}, line {_line_of(text, key, name)}: tenant {name!r}: {message}")

    if not NAME.match(name):
        raise fail(None, "a tenant's name is 1 to 64 letters, digits, '_', '-' or '.' (it labels metrics)")
    if not isinstance(table, dict):
        raise fail(None, f"write it as a table, [tenants.{name}]")
    for key in table:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the fields are {', '.join(FIELDS)}"
            raise fail(key, f"unknown field {key!r}; {hint}")
    counts = {key: _count(table, key, fail) for key in COUNTS}
    weight = table.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
        raise fail("weight", f"weight must be a number above 0, not {weight!r}")
    keys = _strings(table, "keys", fail)
    digests = [_digest(value, fail) for value in _strings(table, "key_sha256", fail)]
    if not keys and not digests and name != ANONYMOUS:
        raise fail(None, "no key: give it keys = [\"...\"] or key_sha256 = [\"<hex>\"] (only [tenants.anonymous] "
                         "takes requests without one)")
    if name == ANONYMOUS and (keys or digests):
        raise fail("keys", "the anonymous tenant serves requests that carry no key; give keys to another tenant")
    models = tuple(glob.lower() for glob in _strings(table, "models", fail)) or ("*",)
    share = Share(name, counts["priority"], float(weight), counts["reserved_slots"], counts["max_slots"])
    if share.max_slots and share.reserved_slots > share.max_slots:
        raise fail("reserved_slots", f"reserved_slots ({share.reserved_slots}) is more than max_slots "
                                     f"({share.max_slots}): it could never use them")
    return Tenant(share, tuple(hashlib.sha256(k.encode()).digest() for k in keys) + tuple(digests),
                  tuple(key_prefix(k) for k in keys), counts["requests_per_minute"], counts["tokens_per_minute"],
                  models)


def _count(table: dict[str, Any], key: str, fail: Any) -> int:
    value = table.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or (value < 0 and key != "priority"):
        raise fail(key, f"{key} must be a whole number{'' if key == 'priority' else ' of 0 or more'}, not {value!r}")
    return value


def _strings(table: dict[str, Any], key: str, fail: Any) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise fail(key, f"{key} must be a list of non-empty strings, such as {key} = [\"...\"]")
    return value


def _digest(value: str, fail: Any) -> bytes:
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise fail("key_sha256", "key_sha256 holds SHA-256 digests, 64 hex digits each (printf %s KEY | sha256sum)")
    return bytes.fromhex(value)


def _check_unique_keys(tenants: dict[str, Tenant], text: str, source: str) -> None:
    owner: dict[bytes, str] = {}
    for tenant in tenants.values():
        for digest in tenant.key_digests:
            if digest in owner and owner[digest] != tenant.name:
                raise TenantsError(f"{source}, line {_line_of(text, 'keys', tenant.name)}: tenant {tenant.name!r} "
                                   f"has a key of tenant {owner[digest]!r}: each key names one tenant")
            owner[digest] = tenant.name


def _line_of(text: str, key: str | None, tenant: str | None = None) -> int:
    """Where ``key`` is written (within ``[tenants.TENANT]`` when given); the table's own line for no key."""
    lines = text.splitlines()
    start = 0
    if tenant is not None:
        header = re.compile(rf"^\s*\[\s*tenants\s*\.\s*[\"']?{re.escape(tenant)}[\"']?\s*\]")
        start = next((i for i, line in enumerate(lines) if header.match(line)), 0)
        if key is None:
            return start + 1
    assignment = re.compile(rf"^\s*[\"']?{re.escape(key or '')}[\"']?\s*=|^\s*\[\s*{re.escape(key or '')}\b")
    for i in range(start, len(lines)):
        if i > start and tenant is not None and lines[i].lstrip().startswith("["):
            break
        if assignment.match(lines[i]):
            return i + 1
    return start + 1
