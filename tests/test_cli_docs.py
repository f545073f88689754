"""docs/cli/ is generated from the commands' own --help: it must match what the CLI says today."""

from __future__ import annotations

import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_cli_pages_are_current():
    pages = runpy.run_path(str(REPO / "scripts" / "cli_docs.py"))["pages"]()
    committed = {p.name: p.read_text(encoding="utf-8") for p in (REPO / "docs" / "cli").glob("*.md")}
    stale = sorted(n for n in set(pages) | set(committed) if pages.get(n) != committed.get(n))
    assert not stale, f"docs/cli out of date for {stale}: run `.venv/bin/python scripts/cli_docs.py`"
    assert {"bench.md", "plan.md", "recipe-run.md", "export-gguf.md", "generate.md"} <= set(pages)
