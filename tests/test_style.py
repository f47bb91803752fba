"""Style the linter does not check: no function in tinyllm/ over MAX_LINES lines (issue 19),
so each piece can be read in one screen. (Static: parses source, runs nothing.)"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def function_lengths() -> dict[str, int]:
    """'file:Class.function' (nested functions too) -> lines from `def` to its last line."""
    out = {}

    def walk(node, path: str, prefix: str):
        for n in ast.iter_child_nodes(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[f"{path}:{prefix}{n.name}"] = n.end_lineno - n.lineno + 1
                walk(n, path, f"{prefix}{n.name}.")
            elif isinstance(n, ast.ClassDef):
                walk(n, path, f"{prefix}{n.name}.")

    for p in sorted((ROOT / "tinyllm").rglob("*.py")):
        walk(ast.parse(p.read_text()), p.relative_to(ROOT / "tinyllm").as_posix(), "")
    return out


def test_no_function_is_over_the_limit():
    lengths = function_lengths()
    assert len(lengths) > 500, "the walk no longer finds tinyllm's functions"
    long = {f: n for f, n in lengths.items() if n > MAX_LINES}
    assert not long, f"split these into well-named pieces of at most {MAX_LINES} lines: {long}"
