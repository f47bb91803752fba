"""docs/READING.md names code and tests a newcomer will go looking for: every `file:Name`,
`Class.method` and `tests/...::test` in it must exist, so the reading path cannot silently
drift from the code it describes. (Static: reads source text, runs nothing.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READING = (ROOT / "docs" / "READING.md").read_text()
PY = {p: p.read_text() for p in (ROOT / "tinyllm").rglob("*.py")}


def _path(f: str) -> Path:
    return ROOT / f if f.startswith(("tests/", "cuda/")) else ROOT / "tinyllm" / f


def _defines(src: str, name: str) -> bool:
    """src defines name: a def or class, a field or assignment, or a kernel/template."""
    n = re.escape(name)
    return re.search(rf"\b(def|class)\s+{n}\b|\b{n}\s*[:=(<]", src) is not None


def test_every_file_and_name_exists():
    refs = set(re.findall(r"([\w/]+\.(?:py|cuh|cu))(?::([A-Za-z_][\w.]*))?", READING))
    assert len(refs) > 30, "the pattern no longer finds READING.md's references"
    missing = []
    for f, name in refs:
        p = _path(f)
        if not p.is_file():
            missing.append(f)
        elif name and not all(_defines(p.read_text(), part) for part in name.split(".")):
            missing.append(f"{f}:{name}")
    assert not missing, missing


def test_every_class_method_exists():
    missing = []
    for cls, meth in set(re.findall(r"\b([A-Z][A-Za-z]+)\.(_?[a-z]\w*)\b", READING)):
        bodies = [
            m.group(1)
            for src in PY.values()
            for m in re.finditer(rf"^class {cls}\b(.*?)(?=^\S|\Z)", src, re.S | re.M)
        ]
        if bodies and not any(_defines(b, meth) for b in bodies):
            missing.append(f"{cls}.{meth}")
    assert not missing, missing


def test_every_named_test_exists():
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    names = set(re.findall(r"::(test_\w+)", READING))
    assert len(names) > 20
    assert not [n for n in names if f"def {n}(" not in tests]
