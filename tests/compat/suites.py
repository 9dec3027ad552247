#!/usr/bin/env python3
"""llama.cpp's own server test suites, run twice: against llama-server directly, and through paddler-sync.

For each build (``$LLAMACPP_DIR/bin/llama-server-*``, or ``--binary``), the suite of that build
(``$LLAMACPP_DIR/suites/BUILD``) is copied to a scratch folder and run with pytest twice, each run in
a network namespace of its own (the suites use the fixed ports 8080 and 8081), with ``LLAMA_SERVER_BIN_PATH``
pointing at ``tests/compat/standin.py``: once in ``direct`` mode (the real llama-server, local models in
place of the ones the suites download), once in ``balancer`` mode (llama-server on a hidden port, an agent,
a balancer on the suite's port). The two runs' outcomes are compared test by test.

Both runs load ``tests/compat/harness.py`` (a pytest plugin): after the harness stops a server, it waits until
nothing listens on its port, so a dying server never answers the next test's first request.

A test that passes directly and fails through the balancer is a difference. Those the balancer makes on
purpose are listed in ``ON_PURPOSE`` with the reason; any other fails the run (exit 1). The summary is
written as a Markdown table (``--out``, default ``tests/compat/RESULTS.md``), each difference with the
first line of its failure.

    python tests/compat/suites.py                      # every build found, the default selection
    python tests/compat/suites.py --build b4748 --files unit/test_basic.py -k props

The suites' client libraries are pinned by each suite's requirements.txt: they go in a venv of their own
per build (``.venv-suites/BUILD``), made on first use.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LLAMACPP_DIR") or ROOT.parent / "shared" / "llamacpp")
STANDIN = Path(__file__).resolve().parent / "standin.py"
SUITE_DIRS = {"b4748": "b4748/examples/server/tests", "2026": "2026/tools/server/tests"}

# The files every build runs by default: what a client of a single server sees. Left out: files that need
# what no model made here has (LoRA, vision, speculative drafts of another vocabulary, tool-call templates of
# named models, MCP servers on the internet), which fail both ways and only cost time.
DEFAULT_FILES = {
    "b4748": ["unit/test_basic.py", "unit/test_security.py", "unit/test_tokenize.py", "unit/test_completion.py",
              "unit/test_chat_completion.py", "unit/test_embedding.py", "unit/test_ctx_shift.py",
              "unit/test_infill.py", "unit/test_rerank.py", "unit/test_speculative.py", "unit/test_slot_save.py"],
    "2026": ["unit/test_basic.py", "unit/test_security.py", "unit/test_tokenize.py", "unit/test_completion.py",
             "unit/test_chat_completion.py", "unit/test_embedding.py", "unit/test_compat_anthropic.py",
             "unit/test_compat_oai_responses.py", "unit/test_ctx_shift.py", "unit/test_infill.py",
             "unit/test_rerank.py", "unit/test_stream.py", "unit/test_ignore_eos.py", "unit/test_sleep.py",
             "unit/test_speculative.py", "unit/test_slot_save.py", "unit/test_router.py"],
}

# The balancer as the tier runs it: its defaults, but /slots let through, as an operator who wants the suites'
# slot checks (a cancelled request frees its slot, ...) to see llama.cpp's own /slots would run it. The agent
# reports every 0.5 s (1 s by default): each /slots poll takes a turn of llama.cpp's main loop.
BALANCER_ARGS = ["--slots-endpoint-enable"]

# Differences the balancer makes on purpose: test id (file::name, parameters dropped) -> why.
ON_PURPOSE: dict[str, str] = {
    "unit/test_basic.py::test_server_slots": "the test starts llama-server without /slots and expects 501; an agent "
    "reads a server's slots from /slots, so the balanced llama-server runs with --slots (b4748: --slots; 2026: "
    "without --no-slots). Without --slots-endpoint-enable the balancer answers /slots 403 itself",
}

# Tests whose outcome depends on timing or on the internet, either way; measured, so a difference on them is
# reported, not failed.
TIMING: dict[str, str] = {
    "unit/test_completion.py::test_cancel_request": "a client leaves a generation after 0.1 s and the test expects the "
    "slot free 2 s later; llama.cpp notices a closed connection at its next 1-s poll and frees the slot 1.8-2.8 s "
    "after the client left, directly and through the balancer alike (which closes the upstream connection at "
    "once): measured here 2.77 / 1.78 s directly, 2.87 / 1.89 s through it, b4748",
    "unit/test_router.py::test_router_delete_model": "it deletes a model the previous test downloads from the "
    "internet (none here); run alone, a router answers its DELETE with 500 'not found' directly and through the "
    "balancer alike (measured); in the suite the direct run passes only on what the failed download left in the "
    "router's cache",
}


@dataclass
class Outcomes:
    """Per test id: 'passed', 'failed', 'error' or 'skipped', and the first line of what went wrong."""

    status: dict[str, str] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)

    def passed(self, test: str) -> bool:
        return self.status.get(test) == "passed"


def read_junit(path: Path) -> Outcomes:
    outcomes = Outcomes()
    if not path.exists():
        return outcomes
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        status, why = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                status = {"failure": "failed"}.get(kind, kind)
                why = (found.get("message") or found.text or "").strip().splitlines()[0:1]
                why = why[0][:160] if why else ""
                break
        outcomes.status[test] = status
        outcomes.why[test] = why
    return outcomes


def suite_venv(build: str) -> Path:
    venv = ROOT / ".venv-suites" / build
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        requirements = SHARED / "suites" / SUITE_DIRS[build] / "requirements.txt"
        # --no-compile: pip's own check that each .pyc it wrote exists failed once under load in CI
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", "-r", str(requirements)],
                       check=True)
        stamp.touch()
    return python


def namespace_prefix() -> list[str]:
    """A network namespace with only a loopback, so the suites' fixed ports are free and runs do not meet."""
    if shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0:
        return ["unshare", "--net", "sh", "-c", 'ip link set lo up 2>/dev/null || true; exec "$@"', "sh"]
    return []


def run_suite(build: str, binary: Path, model: Path, mode: str, files: list[str], keyword: str | None,
              scratch: Path, timeout: float) -> Outcomes:
    """One pytest run of the build's suite, in a copy of it (the suites write their cache beside themselves)."""
    copy = scratch / f"{build}-{mode}"
    shutil.copytree(SHARED / "suites" / build, copy, symlinks=True)
    os.chmod(copy, 0o755)
    for folder, dirs, names in os.walk(copy):
        for name in dirs + names:
            os.chmod(Path(folder) / name, 0o755)
    tests = copy / SUITE_DIRS[build].split("/", 1)[1]
    junit = scratch / f"{build}-{mode}.xml"
    env = {**os.environ, "LLAMA_SERVER_BIN_PATH": str(STANDIN), "COMPAT_MODE": mode,
           "COMPAT_LLAMA_SERVER": str(binary), "COMPAT_MODEL": str(model),
           "COMPAT_LOG_DIR": str(scratch / f"logs-{build}-{mode}"),
           "COMPAT_PADDLER": str(Path(sys.executable).parent / "paddler-sync"),
           "COMPAT_BALANCER_ARGS": " ".join(BALANCER_ARGS),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(STANDIN.parent), os.environ.get("PYTHONPATH")]))}
    argv = [*namespace_prefix(), str(suite_venv(build)), "-m", "pytest", "-p", "no:cacheprovider", "-p", "harness",
            "-q",
            f"--junitxml={junit}", "-o", "junit_family=xunit1", *files]
    if keyword:
        argv += ["-k", keyword]
    with open(scratch / f"{build}-{mode}.log", "wb") as log:
        try:
            subprocess.run(argv, cwd=tests, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\ncompat: the run took longer than {timeout:.0f} s and was stopped\n".encode())
    return read_junit(junit)


def base_id(test: str) -> str:
    return test.split("[", 1)[0]


@dataclass
class Comparison:
    build: str
    direct: Outcomes
    balancer: Outcomes

    @property
    def tests(self) -> list[str]:
        return sorted(set(self.direct.status) | set(self.balancer.status))

    def broken(self) -> list[str]:
        """Pass directly, fail through the balancer."""
        return [t for t in self.tests if self.direct.passed(t) and not self.balancer.passed(t)]

    def unexplained(self) -> list[str]:
        return [t for t in self.broken() if base_id(t) not in ON_PURPOSE and base_id(t) not in TIMING]

    def mended(self) -> list[str]:
        """Fail directly, pass through the balancer (a flaky test, or the balancer answering better)."""
        return [t for t in self.tests if self.balancer.passed(t) and not self.direct.passed(t)
                and self.direct.status.get(t) != "skipped"]


def explanation(test: str) -> str:
    if base_id(test) in ON_PURPOSE:
        return "on purpose: " + ON_PURPOSE[base_id(test)]
    if base_id(test) in TIMING:
        return "both ways alike: " + TIMING[base_id(test)]
    return "**unexplained**"


def report(comparisons: list[Comparison]) -> str:
    lines = ["# llama.cpp's server test suites, directly and through paddler-sync", "",
             "Written by `tests/compat/suites.py` (`make compat`). Each test runs against the real llama-server, "
             "then with every request through a real balancer and agent. Models are made locally (random "
             "weights), so tests that assert a model's exact text fail both ways: only the comparison counts.", "",
             "| build | tests | pass directly | pass through the balancer | pass directly, fail through it "
             "| of those, explained | unexplained |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        broken = c.broken()
        lines.append(f"| {c.build} | {len(c.tests)} | {sum(c.direct.passed(t) for t in c.tests)} "
                     f"| {sum(c.balancer.passed(t) for t in c.tests)} | {len(broken)} "
                     f"| {len(broken) - len(c.unexplained())} | {len(c.unexplained())} |")
    for c in comparisons:
        if c.broken():
            lines += ["", f"## {c.build}: pass directly, fail through the balancer", "",
                      "| test | through the balancer | explained |", "|---|---|---|"]
            lines += [f"| `{t}` | {c.balancer.status.get(t, 'missing')}: {c.balancer.why.get(t, '')} "
                      f"| {explanation(t)} |" for t in c.broken()]
        if c.mended():
            lines += ["", f"## {c.build}: fail directly, pass through the balancer", ""]
            lines += [f"- `{t}` (directly: {c.direct.status.get(t)}: {c.direct.why.get(t, '')})" for t in c.mended()]
    return "\n".join(lines).replace("\r", "") + "\n"


def builds(chosen: list[str] | None, binaries: list[str] | None) -> dict[str, Path]:
    if binaries:
        found = {Path(b).name.removeprefix("llama-server-"): Path(b) for b in binaries}
    else:
        found = {p.name.removeprefix("llama-server-"): p for p in sorted(SHARED.glob("bin/llama-server-*"))}
    return {name: path for name, path in found.items() if name in SUITE_DIRS and (not chosen or name in chosen)}


def make_model(scratch: Path) -> Path:
    subprocess.run([sys.executable, str(SHARED / "make_models.py"), str(SHARED / "ggml-vocab-llama-spm.gguf"),
                    str(scratch / "models")], check=True, capture_output=True, timeout=300)
    return scratch / "models" / "tiny.gguf"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--build", action="append", help="b4748 or 2026 (default: every build found)")
    parser.add_argument("--binary", action="append", help="a llama-server-BUILD binary (default: shared/)")
    parser.add_argument("--files", nargs="+", help="test files of the suite (default: the selection above)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for one pytest run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs) and say where")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                        help="2: the direct and the balancer run side by side; 1: one after the other (lighter)")
    options = parser.parse_args(argv)
    found = builds(options.build, options.binary)
    if not found:
        print(f"compat: no llama-server build found in {SHARED}/bin (or --binary)", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="paddler-compat-"))
    comparisons = []
    try:
        model = make_model(scratch)
        for build, binary in found.items():
            files = options.files or DEFAULT_FILES[build]
            with ThreadPoolExecutor(options.jobs) as pool:
                runs = [pool.submit(run_suite, build, binary, model, mode, files, options.keyword, scratch,
                                    options.timeout) for mode in ("direct", "balancer")]
                direct, balancer = (run.result() for run in runs)
            comparisons.append(Comparison(build, direct, balancer))
    finally:
        if options.keep:
            print(f"compat: logs in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    text = report(comparisons)
    options.out.write_text(text)
    print(text)
    return 1 if any(c.unexplained() for c in comparisons) or any(not c.tests for c in comparisons) else 0


if __name__ == "__main__":
    sys.exit(main())
