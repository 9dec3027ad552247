"""Real llama-server builds for the tests that must hold against llama.cpp itself, not our simulator.

The binaries come from ``LLAMA_SERVER_BINARIES`` (paths separated by ':'), else from ``bin/llama-server-*`` of
the llama.cpp folder ``LLAMACPP_DIR`` (by default ``shared/llamacpp`` beside the checkout, where this project's
machines keep two builds, a model maker and llama.cpp's own server test suites). Models are made once per test
run by its ``make_models.py`` (random weights, real tokenizer, a few seconds). Where no binary or no model maker is
found, every real-server test skips and says why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
SHARED_LLAMACPP = Path(os.environ.get("LLAMACPP_DIR") or ROOT.parent / "shared" / "llamacpp")


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


def metric(url: str, name: str, query: str = "", api_key: str | None = None) -> float:
    """One llamacpp:NAME value from a real server's /metrics (``query``: a router's ``?model=``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = requests.get(url + "/metrics" + query, headers=headers, timeout=15).text  # a busy 2-core machine
    found = re.search(rf"^llamacpp:{name} (\S+)$", text, re.M)
    if found is None:
        raise AssertionError(f"llamacpp:{name} not in /metrics:\n{text}")
    return float(found.group(1))


def busy_slots(url: str) -> int:
    return sum(slot["is_processing"] for slot in requests.get(url + "/slots", timeout=5).json())


class DeferredSampler:
    """The most requests ever waiting inside any of these llama-servers (``llamacpp:requests_deferred``), sampled
    every 20 ms while a load runs: through the balancer it must stay 0.

    A sample that fails (a wrong key, a server gone) fails the test at the end of the block instead of dying
    silently in its thread; ``tolerate_errors`` is for servers that restart on purpose (a model swap)."""

    def __init__(self, urls: list[str], api_key: str | None = None, tolerate_errors: bool = False) -> None:
        self.urls = urls
        self.api_key = api_key
        self.tolerate_errors = tolerate_errors
        self.peak = 0.0
        self.samples = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for url in self.urls:
            try:
                self.peak = max(self.peak, metric(url, "requests_deferred", api_key=self.api_key))
            except (requests.RequestException, AssertionError) as error:
                if not self.tolerate_errors:
                    raise
                self.error = self.error or error
        self.samples += 1

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._sample()
                self._stop.wait(0.02)
        except BaseException as error:
            self.error = error

    def __enter__(self) -> DeferredSampler:
        self._sample()  # one before the load: the block cannot end before the sampler has looked once
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None and not self.tolerate_errors:
            raise AssertionError(f"sampling requests_deferred failed: {self.error}") from self.error
