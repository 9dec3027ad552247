"""Model names: what a llama.cpp server answers to, and how a request's ``model`` is matched against it.

A server answers to its model's id, its aliases and its file path, and, for a path, to the file's
name with and without ``.gguf`` (``/srv/models/Qwen3-8B.gguf`` also answers to ``qwen3-8b.gguf`` and
``qwen3-8b``). Matching ignores case and surrounding spaces and is otherwise exact: no prefixes, no
fuzzy guesses, so a request never lands on a model its client did not name.

A ledger entry (one pool of slots) carries a :class:`Serving`: the names it answers to, whether it
needs a model named (a llama.cpp router serves only the model a request names), whether that model is
loaded, loading or unloaded (router mode loads on demand), and the context each slot holds.
Pure data: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

LOADED, LOADING, UNLOADED, FAILED = "loaded", "loading", "unloaded", "failed"
LOAD_STATES = (LOADED, LOADING, UNLOADED, FAILED)


def normalize(name: str) -> str:
    return name.strip().casefold()


def names_for(names: Iterable[str | None]) -> frozenset[str]:
    """Every name a model answers to, given its id, aliases and path (normalized)."""
    found: set[str] = set()
    for raw in names:
        if not raw or not raw.strip():
            continue
        name = normalize(raw)
        found.add(name)
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        if base:
            found.add(base)
            if base.endswith(".gguf") and len(base) > len(".gguf"):
                found.add(base[: -len(".gguf")])
    return frozenset(found)


@dataclass(frozen=True)
class Serving:
    """What one pool of slots serves. ``names`` empty and ``needs_model`` False: any request (an agent that
    could not read its server's models, or one from before models were reported)."""

    model: str | None = None  # the id it shows (llama.cpp's /v1/models id)
    names: frozenset[str] = field(default_factory=frozenset)
    needs_model: bool = False  # a router: a request must name one of its models
    state: str = LOADED
    n_ctx: int | None = None  # tokens each slot holds (prompt and generation together)
    loadable: bool = False  # unloaded, on a router that loads models on demand (and the balancer lets it)
    modalities: tuple[str, ...] = ()  # what it takes in, where the server says: text, vision, audio
    aliases: tuple[str, ...] = ()  # as llama.cpp lists them in /v1/models (shown, not matched: ``names`` is)
    tags: tuple[str, ...] = ()  # llama-server --tags, shown in /v1/models

    def serves(self, name: str | None) -> bool:
        """``name`` normalized, or None for a request that names no model."""
        if name is None:
            return not self.needs_model
        return name in self.names or (not self.names and not self.needs_model)

    @property
    def is_loaded(self) -> bool:
        return self.state == LOADED

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "names": sorted(self.names), "needs_model": self.needs_model,
                           "state": self.state, "n_ctx": self.n_ctx, "loadable": self.loadable,
                           "modalities": list(self.modalities), "aliases": list(self.aliases),
                           "tags": list(self.tags)})

    @classmethod
    def from_json(cls, raw: str | None) -> Serving:
        """A shared store's copy; anything unreadable serves like an entry without models."""
        if not raw:
            return ANY
        try:
            body: dict[str, Any] = json.loads(raw)
            return cls(model=body.get("model"), names=frozenset(body.get("names") or ()),
                       needs_model=bool(body.get("needs_model")), state=str(body.get("state") or LOADED),
                       n_ctx=body.get("n_ctx"), loadable=bool(body.get("loadable")),
                       modalities=tuple(body.get("modalities") or ()), aliases=tuple(body.get("aliases") or ()),
                       tags=tuple(body.get("tags") or ()))
        except (ValueError, TypeError, AttributeError):
            return ANY


ANY = Serving()
