"""The rules a reader relies on: short functions, imports at the top in a graph without circles, the method
apart from the plumbing, and a package that never imports the reference implementations."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dreambooth_min"
SOURCES = sorted(PACKAGE.rglob("*.py")) + [ROOT / "train.py", ROOT / "sample.py", ROOT / "evaluate.py", ROOT / "lora_tools.py"]
METHOD = {"scheduler", "dreambooth", "lora", "sampling"}
MODELS = {"unet", "vae", "text", "layers", "memory", "model"}
TOP = METHOD | MODELS | {"conditioning", "errors"}
WINGS = ("formats", "run", "watch")
# What each part of the house may import, besides itself: the wings sit beside the method, never in it.
MAY_IMPORT = {"top": {"top"}, "formats": {"top", "formats"}, "watch": {"top", "formats", "watch"},
              "run": {"top", "formats", "watch", "run"}}


def _functions(path):
    tree = ast.parse(path.read_text())
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path):
    """(import node, the package modules it names, inside a function?) for every import of `path`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                named = {f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in modules}
                named |= {base} if base in modules and not named else set()
                found.append((child, named, inside))
            elif isinstance(child, ast.Import):
                found.append((child, {a.name for a in child.names if a.name in modules}, inside))
            visit(child, inside)
    visit(ast.parse(path.read_text()), False)
    return [(node, {m for m in named if m.startswith("dreambooth_min")}, inside) for node, named, inside in found]


def _graph():
    return {_module_name(p): {m for _, named, _ in _imports(p) for m in named} - {_module_name(p)}
            for p in sorted(PACKAGE.rglob("*.py"))}


def _part(module):
    """'top', a wing's name, or None for the package face and the wings' own __init__ files."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    return "top" if len(parts) == 1 and parts[0] not in WINGS else parts[0]


def test_no_function_is_longer_than_60_lines():
    long = [f"{p.relative_to(ROOT)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for p in SOURCES if p.exists() for f in _functions(p) if f.end_lineno - f.lineno + 1 > 60]
    assert not long, long


def test_the_package_never_imports_the_reference_implementations():
    found = []
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{p.name}: {n}" for n in names if n.split(".")[0] in ("diffusers", "peft", "accelerate")]
    assert not found, found


def test_the_import_graph_has_no_circle():
    graph, state, circles = _graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                circles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_package_imports_sit_at_the_top_of_their_module():
    """Only the package face's lazy __getattr__ imports late (it keeps `import dreambooth_min.scheduler` light)."""
    late = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"
            for node, named, inside in _imports(p) if inside and named]
    assert not late, late


def test_the_method_imports_only_the_method_the_models_conditioning_and_errors():
    allowed = {f"dreambooth_min.{m}" for m in TOP}
    wrong = {f"dreambooth_min.{m}": sorted(_graph()[f"dreambooth_min.{m}"] - allowed) for m in METHOD}
    assert not any(wrong.values()), wrong


def test_each_part_of_the_house_imports_only_what_it_may():
    wrong = [f"{m} -> {n}" for m, targets in _graph().items() for n in targets
             if _part(m) and _part(n) and _part(n) not in MAY_IMPORT[_part(m)]]
    assert not wrong, wrong


def test_each_wing_says_what_lives_there_and_what_it_may_import():
    for wing in WINGS:
        doc = ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text())) or ""
        assert "import" in doc and len(doc.split()) > 20, f"{wing}/__init__.py: {doc!r}"


def test_the_top_of_the_package_holds_the_method_and_the_models_only():
    flat = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert flat == TOP, sorted(flat ^ TOP)
