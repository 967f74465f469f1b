"""The README and docs/ say only true things about the code: line counts, function names, paths and links.

Line counts are claimed in README.md's table of the method's files (`| `path` | lines | what |`, then a
`| total | N |` row). A failure prints the true numbers, ready to paste.
"""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dreambooth_min"
README = ROOT / "README.md"
PAGES = [README, ROOT / "weights" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 220

COUNT_ROW = re.compile(r"^\|\s*`([\w./-]+\.py)`\s*\|\s*(\d+)\s*\|", re.M)
TOTAL_ROW = re.compile(r"^\|\s*total\s*\|\s*(\d+)\s*\|", re.M)
CODE_REF = re.compile(r"`([\w/]+\.py):\s?([A-Za-z_][\w.]*)`")  # `scheduler.py:add_noise`, `state.py:A.b`
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FOREIGN = {"examples/dreambooth/train_dreambooth_lora.py"}  # diffusers' script (docs/benchmarks.md), not ours
REPO_PATH = re.compile(r"`((?:dreambooth_min|tests|examples|benchmarks|docs|tools)/[\w./-]*\.(?:py|md|json|png))`")


def line_count(path):
    return len(path.read_text().splitlines())


def test_readme_is_short():
    n = line_count(README)
    assert n <= MAX_README_LINES, f"README.md has {n} lines; at most {MAX_README_LINES}: move detail to docs/"


def test_claimed_line_counts_are_true():
    text = README.read_text()
    claims = [(p, int(n)) for p, n in COUNT_ROW.findall(text)]
    assert claims, "README.md has no `| `file.py` | lines |` rows to check"
    true = [(p, line_count(ROOT / p)) for p, _ in claims]
    total = TOTAL_ROW.search(text)
    true_total = sum(n for _, n in true)
    wrong = [f"{p}: README says {n}, the file has {t}" for (p, n), (_, t) in zip(claims, true) if n != t]
    if total and int(total.group(1)) != true_total:
        wrong.append(f"total: README says {total.group(1)}, the files have {true_total}")
    paste = "\n".join([f"| `{p}` | {t} |" for p, t in true] + [f"| total | {true_total} |"])
    assert not wrong, "\n".join(wrong) + "\nThe true counts:\n" + paste


def resolve(name):
    """`run/training.py` or `training.py` or a repo path -> the one file it names, else None."""
    for path in (ROOT / name, PACKAGE / name):
        if path.is_file():
            return path
    found = [p for p in PACKAGE.rglob(Path(name).name) if p.as_posix().endswith("/" + name)]
    return found[0] if len(found) == 1 else None


def names_in(body):
    """Names defined at the top of `body`: functions, classes, assignments (class fields included)."""
    out = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.Assign):
            out.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return out


def defines(path, dotted):
    """`name` (top level, or a method of any class in the file) or `Class.member` is defined in `path`."""
    top = names_in(ast.parse(path.read_text()).body)
    first, *rest = dotted.split(".")
    if not rest:
        return first in top or any(first in names_in(c.body) for c in top.values() if isinstance(c, ast.ClassDef))
    node = top.get(first)
    return isinstance(node, ast.ClassDef) and len(rest) == 1 and rest[0] in names_in(node.body)


def test_every_named_function_exists():
    wrong = []
    for page in PAGES:
        for file, name in CODE_REF.findall(page.read_text()):
            path = resolve(file)
            if path is None:
                wrong.append(f"{page.relative_to(ROOT)}: `{file}:{name}`: no such file (or more than one)")
            elif not defines(path, name):
                wrong.append(f"{page.relative_to(ROOT)}: `{file}:{name}`: {path.relative_to(ROOT)} has no {name}")
    assert not wrong, "\n".join(wrong)


def test_every_named_path_exists():
    wrong = [f"{page.relative_to(ROOT)}: `{p}` does not exist"
             for page in PAGES for p in REPO_PATH.findall(page.read_text()) if p not in FOREIGN and not (ROOT / p).exists()]
    assert not wrong, "\n".join(wrong)


def test_every_relative_link_resolves():
    wrong = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, or an anchor in the same page
            if not (page.parent / target.split("#")[0]).exists():
                wrong.append(f"{page.relative_to(ROOT)}: link to {target} points to no file")
    assert not wrong, "\n".join(wrong)
