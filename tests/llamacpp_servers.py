"""Real llama-server builds for the tests that must hold against llama.cpp itself, not our simulator.

The binaries come from ``LLAMA_SERVER_BINARIES`` (paths separated by ':'), else from
``../shared/llamacpp/bin/llama-server-*`` beside the checkout. Models are made once per test run
by ``make_models.py`` (random weights, real tokenizer, a few seconds). Where no binary or no model
maker is found, every real-server test skips and says why: a fresh clone without shared/ has none.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
SHARED_LLAMACPP = ROOT.parent / "shared" / "llamacpp"


@dataclass(frozen=True)
class Build:
    """One llama-server binary; ``name`` is its suffix (b4748, 2026)."""

    name: str
    path: Path

    @property
    def modern(self) -> bool:
        """2026-style: /slots on by default, is_sleeping, /v1/responses and /v1/messages."""
        return self.name != "b4748"

    def slots_flags(self) -> list[str]:
        return [] if self.modern else ["--slots"]


def find_builds() -> list[Build]:
    listed = os.environ.get("LLAMA_SERVER_BINARIES")
    paths = [Path(p) for p in listed.split(":") if p] if listed else sorted(SHARED_LLAMACPP.glob("bin/llama-server-*"))
    return [Build(re.sub(r"^llama-server-?", "", p.name) or p.name, p) for p in paths if os.access(p, os.X_OK)]


def missing_reason() -> str | None:
    if not find_builds():
        return ("no llama-server binary: set LLAMA_SERVER_BINARIES=/path/llama-server[:...] or put "
                f"{SHARED_LLAMACPP}/bin/llama-server-* beside the checkout")
    if not (SHARED_LLAMACPP / "make_models.py").exists():
        return f"no model maker at {SHARED_LLAMACPP}/make_models.py"
    return None


def make_models(out: Path) -> dict[str, Path]:
    """tiny.gguf (~2,000 tokens/s for one stream with -t 1) and slow.gguf (~115 tokens/s)."""
    subprocess.run([sys.executable, str(SHARED_LLAMACPP / "make_models.py"),
                    str(SHARED_LLAMACPP / "ggml-vocab-llama-spm.gguf"), str(out)],
                   check=True, capture_output=True, timeout=120)
    return {"tiny": out / "tiny.gguf", "slow": out / "slow.gguf"}


def metric(url: str, name: str, query: str = "") -> float:
    """One llamacpp:NAME value from a real server's /metrics (``query``: a router's ``?model=``)."""
    text = requests.get(url + "/metrics" + query, timeout=15).text  # a busy 2-core machine: generous
    found = re.search(rf"^llamacpp:{name} (\S+)$", text, re.M)
    if found is None:
        raise AssertionError(f"llamacpp:{name} not in /metrics:\n{text}")
    return float(found.group(1))


def busy_slots(url: str) -> int:
    return sum(slot["is_processing"] for slot in requests.get(url + "/slots", timeout=5).json())
