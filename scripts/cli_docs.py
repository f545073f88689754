#!/usr/bin/env python
"""Write docs/cli/: one Markdown page per kiln command, generated from its own --help.

Why generated: the pages can then never disagree with the CLI; tests/test_cli_docs.py fails when
a command's help changed and the pages were not regenerated (`python scripts/cli_docs.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "docs" / "cli"


def _commands(group: click.Group, prefix: list[str]):
    ctx = click.Context(group, info_name=" ".join(prefix))
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        path = [*prefix, name]
        yield path, cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path)


def _help(path: list[str], cmd: click.Command) -> str:
    parent = None
    for i in range(1, len(path)):
        parent = click.Context(click.Command(path[i - 1]), info_name=path[i - 1], parent=parent)
    ctx = click.Context(cmd, info_name=path[-1], parent=parent, max_content_width=100, terminal_width=100)
    return cmd.get_help(ctx)


def pages() -> dict[str, str]:
    """{file name: Markdown} for every command and group, plus index.md."""
    from kiln.cli import cli

    out: dict[str, str] = {}
    index = ["# kiln command reference", "", "Generated from each command's `--help` by `scripts/cli_docs.py`.", ""]
    for path, cmd in _commands(cli, ["kiln"]):
        name = "-".join(path[1:]) + ".md"
        title = " ".join(path)
        out[name] = f"# `{title}`\n\n```text\n{_help(path, cmd).rstrip()}\n```\n"
        summary = (cmd.help or "").strip().split("\n")[0]
        index.append(f"- [`{title}`]({name}): {summary}")
    out["index.md"] = "\n".join(index) + "\n"
    return out


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    wanted = pages()
    for old in OUT.glob("*.md"):
        if old.name not in wanted:
            old.unlink()
    for name, text in wanted.items():
        (OUT / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(wanted)} pages to {OUT.relative_to(REPO)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
