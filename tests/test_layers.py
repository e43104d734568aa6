"""The package's layers: every import (module level or inside a function) points down.

    foundation (config, checkpoint, execution) → data → tasks → features → baselines → learned
    → outer → experiments → cli

Read from the source with ``ast``, nothing imported. The root package ``l2o`` is the foundation
when imported (``l2o.__version__``); its own ``__init__`` may import the layers only lazily, inside
functions, so that ``import l2o.<anything>`` stays light. A new top-level module or package must be
given a layer here, or this test fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "checkpoint", "execution"),
    ("data",),
    ("tasks",),
    ("features",),
    ("baselines",),
    ("learned",),
    ("outer",),
    ("experiments",),
    ("cli",),
)
SRC = Path(__file__).resolve().parents[1] / "src" / "l2o"


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name of the package (None: not ours, or unplaced)."""
    parts = module.split(".")
    if parts[0] != "l2o":
        return None
    if len(parts) == 1:
        return 0
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)


def imports_of(path: Path, module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
            # ``from l2o import tasks`` imports the subpackage l2o.tasks
            if names == ["l2o"]:
                names = [f"l2o.{a.name}" if layer_of(f"l2o.{a.name}") is not None else "l2o" for a in node.names]
        else:
            continue
        out += [(n, node.lineno, id(node) in top) for n in names]
    return out


def violations(src: Path) -> list[str]:
    """Every import of a higher layer, every unplaced top-level module, every eager import in the
    root ``__init__``."""
    found = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if module == "l2o":
            found += [f"l2o/__init__.py:{line} imports {m} at module level (only lazily, inside functions)"
                      for m, line, top in imports_of(path, module) if top and m.startswith("l2o.")]
            continue
        mine = layer_of(module)
        if mine is None:
            found.append(f"{module} is in no layer: add {module.split('.')[1]!r} to LAYERS in tests/test_layers.py")
            continue
        for m, line, _ in imports_of(path, module):
            theirs = layer_of(m)
            if theirs is not None and theirs > mine:
                found.append(f"{module}:{line} (layer {LAYERS[mine][0]}) imports {m} (layer {LAYERS[theirs][0]})")
    return found


def test_imports_point_down_only():
    assert SRC.is_dir()
    assert violations(SRC) == []


def test_the_check_finds_an_upward_import_an_unplaced_module_and_an_eager_root_import(tmp_path):
    """The checker itself, on a tiny fake package: it must be able to fail."""
    pkg = tmp_path / "l2o"
    (pkg / "tasks").mkdir(parents=True)
    (pkg / "learned").mkdir()
    (pkg / "__init__.py").write_text("import l2o.tasks\n\ndef f():\n    from l2o import cli\n")
    (pkg / "tasks" / "__init__.py").write_text("")
    (pkg / "tasks" / "base.py").write_text("def g():\n    from ..learned import psd\n")
    (pkg / "learned" / "__init__.py").write_text("from l2o.tasks import base\n")
    (pkg / "learned" / "psd.py").write_text("from . import __name__ as n\n")
    (pkg / "mystery.py").write_text("")
    found = violations(pkg)
    assert any("l2o/__init__.py:1 imports l2o.tasks" in v for v in found), found
    assert any(v.startswith("l2o.tasks.base:2") and "imports l2o.learned" in v for v in found), found
    assert any("l2o.mystery is in no layer" in v for v in found), found
    assert len(found) == 3, found  # learned → tasks points down; the lazy root import is allowed
