"""House rules of ../shared/STYLE.md that a reviewer would otherwise check by eye: small functions in the library."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "spec_lightning"
MAX_BODY_LINES = 60


def long_functions(source: str, limit: int = MAX_BODY_LINES) -> list[tuple[str, int]]:
    """``(name, body lines)`` of every function whose body (docstring excluded) spans more than ``limit`` lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        has_doc = len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        first = body[1] if has_doc else body[0]
        lines = node.end_lineno - first.lineno + 1
        if lines > limit:
            found.append((node.name, lines))
    return found


def test_the_counter_sees_a_long_body_and_ignores_the_docstring():
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert long_functions(f"def f():\n{body}\n") == [("f", 61)]
    short = "\n".join(f"    x{i} = {i}" for i in range(60))
    doc = '    """' + "\n".join("doc" for _ in range(30)) + '"""\n'
    assert long_functions(f"def f():\n{doc}{short}\n") == []
    assert long_functions(f"class C:\n    def m(self):\n{body.replace('    ', '        ')}\n") == [("m", 61)]


def test_no_function_body_over_60_lines_in_the_library():
    offenders = {str(p.relative_to(LIBRARY)): found for p in sorted(LIBRARY.rglob("*.py"))
                 if (found := long_functions(p.read_text()))}
    assert offenders == {}, "split these into named steps"
