"""mkdocs hook: the measured results are written where their benchmarks live (bench/RESULTS.md and its plots,
bench/REVISIONS.md, tests/compat/RESULTS.md); the site shows them under the same paths, so they are written once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
FROM_THE_REPOSITORY = ("bench/RESULTS.md", "bench/REVISIONS.md", "tests/compat/RESULTS.md", "bench/*.png")


def on_files(files: Files, config: Any) -> Files:
    for pattern in FROM_THE_REPOSITORY:
        for path in sorted(ROOT.glob(pattern)):
            relative = path.relative_to(ROOT).as_posix()
            files.append(File(relative, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
