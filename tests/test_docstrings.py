"""Every public class, function and method of the runtime says what it is for."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "orchestrator"


def _undocumented(path: Path) -> list[str]:
    missing: list[str] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if child.name.startswith("_"):
                continue
            decorators = {ast.unparse(d) for d in child.decorator_list}
            if "overload" not in decorators and ast.get_docstring(child) is None:
                missing.append(
                    f"{path.relative_to(PACKAGE.parent)}:{child.lineno} {prefix}{child.name}"
                )
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return missing


def test_every_public_name_has_a_docstring() -> None:
    # The symlinked agents/ and schemas/ are part of the installed package too (rglob
    # does not follow the links, so they are walked from their own roots).
    roots = [PACKAGE, PACKAGE / "agents", PACKAGE / "schemas"]
    files = sorted({p.resolve(): p for root in roots for p in root.rglob("*.py")}.values())
    missing = [name for path in files for name in _undocumented(path)]
    assert not missing, "undocumented public names:\n" + "\n".join(missing)
