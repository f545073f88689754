"""Imports point one way (docs/architecture.md, DESIGN.md §1): no module imports from a layer above its own.

Every `import` and `from ... import` in src/kiln is read with `ast`, including those inside
functions (a late import is still a dependency), and checked against the table below, which is the
layer order docs/architecture.md describes. The runtime is a branch of its own: it sees only the
base modules, so an app embeds `kiln.runtime` without torch, transformers or the exporters.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "kiln"

# top-level package or module of kiln -> its layer
LAYER_OF = {
    **dict.fromkeys(("kiln", "errors", "jsonfile", "paths", "atomic", "outputs", "manifest", "bytelevel",
                     "gguf_header", "llamacpp_log", "pinned_math"), "base"),
    "checkpoint": "model", "families": "model",
    "compress": "compress",
    "export": "export",
    "runtime": "runtime", "formats": "runtime",
    "serve": "apps", "chat": "apps",
    "verify": "verify",
    **dict.fromkeys(("pipeline", "evaluate", "longeval", "inspect_artifact", "bench", "fixtures"), "tools"),
    "cli_common": "cli-support",
    "recipe": "recipe",
    "cli": "cli",
}
BELOW = {
    "base": set(),
    "model": {"base"},
    "compress": {"base", "model"},
    "export": {"base", "model", "compress"},
    "runtime": {"base"},
    "apps": {"base", "runtime"},
    "verify": {"base", "model", "compress", "export", "runtime"},
    "cli-support": {"base"},
    "tools": {"base", "model", "compress", "export", "runtime", "verify", "cli-support"},
    "recipe": {"base", "model", "compress", "export", "runtime", "verify", "cli-support", "tools"},
    "cli": {"base", "model", "compress", "export", "runtime", "apps", "verify", "cli-support", "tools", "recipe"},
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kiln"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                (node.module == "kiln" or node.module.startswith("kiln.")):
            if node.module == "kiln":  # `from kiln import families` names a package, `__version__` an attribute
                names = [f"kiln.{a.name}" if (SRC / a.name).is_dir() or (SRC / f"{a.name}.py").is_file() else "kiln"
                         for a in node.names]
            else:
                names = [node.module]
            found += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name == "kiln" or a.name.startswith("kiln.")]
    return found


def test_every_unit_has_a_layer() -> None:
    units = {p.stem if p.parent == SRC else p.relative_to(SRC).parts[0] for p in SRC.rglob("*.py")}
    units.discard("__init__")
    assert units - set(LAYER_OF) == set(), "add new packages to LAYER_OF and docs/architecture.md"


def test_no_import_from_a_higher_layer() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        me = LAYER_OF[_unit(".".join(parts))]
        for line, module in _imports(path):
            other = LAYER_OF.get(_unit(module))
            if other is None:
                wrong.append(f"{rel}:{line}: {module} belongs to no layer")
            elif other != me and other not in BELOW[me]:
                wrong.append(f"{rel}:{line}: {me} imports {module} ({other})")
    assert not wrong, "\n".join(wrong)


def test_the_runtime_embeds_without_torch() -> None:
    """What the table promises, checked for real: importing the runtime loads no torch/transformers."""
    import subprocess
    import sys

    code = ("import sys, kiln.runtime, kiln.runtime.smc, kiln.runtime.steering; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
