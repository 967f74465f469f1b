"""The rules a reader relies on: short functions, and a package that never imports the references."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "dreambooth_min").rglob("*.py")) + [ROOT / "train.py", ROOT / "sample.py", ROOT / "evaluate.py"]


def _functions(path):
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_60_lines():
    long = [f"{p.relative_to(ROOT)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for p in SOURCES if p.exists() for f in _functions(p) if f.end_lineno - f.lineno + 1 > 60]
    assert not long, long


def test_the_package_never_imports_the_reference_implementations():
    found = []
    for p in (ROOT / "dreambooth_min").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{p.name}: {n}" for n in names if n.split(".")[0] in ("diffusers", "peft", "accelerate")]
    assert not found, found
