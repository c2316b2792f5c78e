"""The package's shape, as its contributors keep it: no function over 70 lines, and no module importing another
package's private (`_name`) names — a helper used across packages is public."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rayrobust"
MAX_LINES = 70


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def _package(path: Path) -> str:
    return path.parent.relative_to(ROOT.parent).as_posix().replace("/", ".")


def _imported_module(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package(path).split(".")
    if node.level > 1:
        base = base[: -(node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_function_is_longer_than_70_lines():
    lengths = sorted(((n.end_lineno - n.lineno + 1, f"{p.relative_to(ROOT.parent)}:{n.lineno} {n.name}")
                      for p, tree in _modules() for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), reverse=True)
    print("longest:", lengths[:5])
    assert len(lengths) > 100 and lengths[0][0] <= MAX_LINES, lengths[:5]


def test_no_private_name_is_imported_across_packages():
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = _imported_module(path, node)
            if not module.startswith("rayrobust"):
                continue
            is_module = (ROOT.parent / (module.replace(".", "/") + ".py")).exists()
            owner = module.rsplit(".", 1)[0] if is_module else module
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and owner != _package(path):
                    found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} from {module} import {alias.name}")
    assert not found, found
    # the check sees private imports: one within a package is allowed and present
    assert any(alias.name.startswith("_") for _, tree in _modules() for n in ast.walk(tree)
               if isinstance(n, ast.ImportFrom) for alias in n.names)
