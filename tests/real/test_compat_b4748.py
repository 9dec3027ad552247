"""llama.cpp's own server test suite of the b4748 build, a selection, directly and through a real balancer, agent and
llama-server: each test passes through the balancer exactly when it passes directly (tests/compat/selection.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.compat.selection import passes_through_the_balancer_as_directly

pytestmark = pytest.mark.real_llamacpp


def test_what_passes_directly_passes_through_the_balancer(tmp_path: Path) -> None:
    passes_through_the_balancer_as_directly("b4748", tmp_path)
