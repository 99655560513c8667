"""The pack's import graph, read from the source (ast; nothing is imported): no cycles, and imports run one way.

Every import counts, function-local ones included (a cycle hidden inside a function is still a cycle).
Rules (issue 14): no import cycle among the pack's modules; the backend (trainer/) imports neither
devtools nor tests; devtools does not import tests; a node module imports no `_private` name of another.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK = "klein_lora_studio"
SKIP = {".git", "example_workflows", "web", "docs", "__pycache__", ".venv"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for p in REPO.rglob("*.py"):
        if not SKIP & set(p.relative_to(REPO).parts):
            out[_module_name(p)] = p
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _absolute(module: str, level: int, name: str | None) -> str:
    """The pack-relative name of `from <level dots><name>` written in `module`."""
    if level == 0:
        return (name or "").removeprefix(PACK + ".") if (name or "").startswith(PACK) else ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, *([name] if name else [])]).strip(".")


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def imports_of(module: str) -> list[tuple[str, str | None]]:
    """(imported pack module, imported name or None) for every import in `module`'s file."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    skip, out = _type_checking_only(tree), []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _absolute(module, 0, alias.name)
                if target:
                    out.append((target, None))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node.level, node.module)
            if node.level == 0 and not base:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}".strip(".")
                out.append((sub, None) if sub in MODULES else (base, alias.name))
    return [(m, n) for m, n in out if m in MODULES or m == ""]


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in imports_of(m) if t and t != m} for m in MODULES}


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return comps


def test_the_import_graph_sees_the_pack():
    g = graph()
    assert "trainer.training.loop" in g and "trainer.jobs.session" in g["nodes.lora_trainer"]
    assert {"trainer.training.config", "trainer.training.run_files"} <= g["trainer.training.loop"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = [c for c in find_cycles(graph())]
    assert not cycles, f"import cycles: {cycles}"


def _direction_problems() -> list[tuple[str, str]]:
    bad = []
    for module in MODULES:
        top = module.split(".")[0]
        for target, name in imports_of(module):
            where = target.split(".")[0]
            if top == "trainer" and where in ("devtools", "tests"):
                bad.append((module, target))
            elif top == "devtools" and where == "tests":
                bad.append((module, target))
            elif (top == "nodes" and where == "nodes" and target != module and name and name.startswith("_")
                  and not name.startswith("__")):
                bad.append((module, f"{target}.{name}"))
    return bad


def test_imports_run_one_way():
    problems = [p for p in _direction_problems()]
    assert not problems, f"imports against the layering (importer, imported): {problems}"


def _fstrings(path: Path):
    """(line, text) of every f-string in the file, each replacement field written as {}."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.JoinedStr):
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)


# (the one module allowed to build the name, the pattern of the name)
ONE_PLACE = {"run files (<run>_checkpoints, <run>_stepNNNNN)": ("trainer.training.run_files", r"\{\}_(checkpoints|step)"),
             "size keys (flux2-<d>x<s>-h<hidden>)": ("trainer.model.sizes", r"flux2-\{\}x\{\}")}


def test_run_file_names_and_size_keys_are_built_in_one_place():
    offenders = [f"{what}: {m} line {line} builds {text!r}"
                 for m, path in MODULES.items() if m.startswith(("trainer", "nodes"))
                 for what, (home, pattern) in ONE_PLACE.items() if m != home
                 for line, text in _fstrings(path) if re.search(pattern, text)]
    assert not offenders, offenders
