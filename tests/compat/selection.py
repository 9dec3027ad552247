"""llama.cpp's own server test suites through the balancer, the selection `make test` runs (one test file per
build, so the two run side by side): each test passes through a real balancer,
agent and llama-server exactly when it passes against llama-server directly (``make compat`` runs every file of
both suites and writes tests/compat/RESULTS.md; this keeps ``make test`` within its time).

The selection is what a balancer could most easily get wrong: health, props and the model list with aliases and
tags, model names a single server ignores (OpenAI and Anthropic clients), context shift, tokenizing, a chat through
the OpenAI library. About a minute and a half on 2 cores, both builds.
Skips, saying why, where the builds or their suites are not in LLAMACPP_DIR, or where no network namespace
can be made (the suites need the fixed ports 8080 and 8081).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.compat import suites

SELECTION = {
    "b4748": (["unit/test_basic.py", "unit/test_tokenize.py", "unit/test_ctx_shift.py",
               "unit/test_chat_completion.py"],
              "not test_chat_completion or test_chat_completion_with_openai_library or model or logprobs"),
    "2026": (["unit/test_basic.py", "unit/test_compat_anthropic.py"],  # each file starts 8 servers first: two
             "not test_compat_anthropic or test_anthropic_messages_basic or test_anthropic_count_tokens "
             "or test_anthropic_streaming"),
}


def why_not() -> str | None:
    if not (suites.SHARED / "suites").is_dir():
        return f"llama.cpp's server suites are not at {suites.SHARED / 'suites'}"
    if not shutil.which("unshare") or subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode:
        return "no network namespace can be made here (unshare --net): the suites need ports 8080 and 8081"
    return None


def passes_through_the_balancer_as_directly(build: str, tmp_path: Path) -> None:
    """Run the build's selection directly and through the balancer; skips, saying why, where it cannot run."""
    reason = why_not() or (None if suites.builds([build], None) else f"no llama-server-{build} in {suites.SHARED}/bin")
    if reason:
        pytest.skip(reason)
    files, keyword = SELECTION[build]
    out = tmp_path / "RESULTS.md"
    code = suites.main(["--build", build, "--files", *files, "-k", keyword, "--out", str(out), "--timeout", "400",
                        "--jobs", "1"])  # one run at a time: the rest of the suite runs beside it
    report = out.read_text()
    assert code == 0, report
    row = next(line for line in report.splitlines() if line.startswith(f"| {build} |"))
    tests, passed_directly = (int(cell) for cell in row.split("|")[2:4])
    assert tests >= 10 and passed_directly >= tests // 2, report  # it ran, and llama.cpp passed most of them
