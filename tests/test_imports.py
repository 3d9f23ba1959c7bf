"""The import graph keeps the design's shape (DESIGN.md section 2).

Imports run one way: tools/bench -> train/inference -> trainer -> build -> (checkpoints, models, data, tasks)
-> registry/config. The checks read the source with `ast` (nothing is imported) and fail on

* a cycle between modules of engine/ (any import, at the top or inside a function),
* an import from a lower layer to a higher one,
* a private name (``_x``) taken from another file, by ``from m import _x`` or ``m._x``,
* an import inside a function of engine/ without a comment saying why it is not at the top,

each named with file and line. The planted-violation tests run the same checks on a copy of the tree
with one violation written into it, so the checks are shown to fail.
"""
from __future__ import annotations

import ast
import os
import shutil
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Higher numbers sit higher; a module may import its own layer or a lower one (never in a cycle).
LAYERS: List[Tuple[str, int]] = [
    ("engine.registry", 0), ("engine.problems", 0), ("engine.typed", 0), ("engine.faults", 0), ("engine.config", 0),
    ("engine.deepspeed_config", 0),
    ("engine.checkpoints", 1), ("engine.models", 1), ("engine.data", 1), ("engine.tasks", 1),
    ("engine.build", 2),
    ("engine.trainer", 3), ("engine.memory", 3), ("engine.model_facts", 3),
    ("engine.train", 4), ("engine.inference", 4), ("engine.export", 4), ("engine.__main__", 4), ("engine.startup", 4),
    ("tools", 5), ("bench", 5),
]
LAYER_NAMES = {0: "registry/config", 1: "checkpoints/models/data/tasks", 2: "build", 3: "trainer",
               4: "train/inference", 5: "tools/bench"}
SCANNED = ("engine", "tools", "bench")


def layer_of(module: str) -> Optional[int]:
    best = None
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return None if best is None else best[1]


class Import:
    def __init__(self, path: str, line: int, target: str, names: List[str], in_function: bool, commented: bool):
        self.path, self.line, self.target, self.names = path, line, target, names
        self.in_function, self.commented = in_function, commented

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def read_imports(root: str, path: str, modules: Set[str]):
    """(imports of repository modules, {alias: module} for attribute checks) of one file."""
    with open(path, encoding="utf-8") as f:
        src = f.read()
    lines = src.splitlines()
    tree = ast.parse(src, filename=path)
    me = module_name(root, path)
    package = me if path.endswith("__init__.py") else me.rpartition(".")[0]
    rel = os.path.relpath(path, root)
    out: List[Import] = []
    aliases: Dict[str, str] = {}

    def commented(node) -> bool:
        """A comment on the line, or above the group of import lines the statement belongs to."""
        if "#" in lines[node.lineno - 1]:
            return True
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith(("import ", "from ")):
            i -= 1
        return i >= 0 and lines[i].strip().startswith("#")

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                continue  # annotations only: never imported at run time
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    out.append(Import(rel, child.lineno, a.name, [], in_function, commented(child)))
                    if a.asname and a.name in modules:
                        aliases[a.asname] = a.name
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)] if child.level > 1 else base
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                names = [a.name for a in child.names]
                out.append(Import(rel, child.lineno, target, names, in_function, commented(child)))
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    if sub in modules:
                        aliases[a.asname or a.name] = sub
            visit(child, fn)

    visit(tree, False)
    return me, out, aliases, tree


def scan(root: str):
    files = []
    for top in SCANNED:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    modules = {module_name(root, p) for p in files}
    return sorted(files), modules


def resolve(target: str, names: List[str], modules: Set[str]) -> List[str]:
    """The repository modules an import statement loads (the package and any named submodules)."""
    out = []
    if target in modules:
        out.append(target)
    for n in names:
        if f"{target}.{n}" in modules:
            out.append(f"{target}.{n}")
    return out


def find_violations(root: str) -> List[str]:
    files, modules = scan(root)
    graph: Dict[str, Dict[str, Import]] = {}
    problems: List[str] = []
    for path in files:
        me, imports, aliases, tree = read_imports(root, path, modules)
        mine = layer_of(me)
        edges = graph.setdefault(me, {})
        for imp in imports:
            if imp.in_function and me.startswith("engine") and not imp.commented:
                problems.append(f"{imp.where()}: import of {imp.target} inside a function without a comment "
                                f"saying why it is not at the top of the file")
            targets = resolve(imp.target, imp.names, modules)
            if not targets:
                continue
            for t in targets:
                if t != me and not me.startswith(t + "."):  # a package's own __init__ is not a dependency cycle
                    edges.setdefault(t, imp)
                theirs = layer_of(t)
                if mine is not None and theirs is not None and theirs > mine:
                    problems.append(f"{imp.where()}: layer order: {me} ({LAYER_NAMES[mine]}) imports {t} "
                                    f"({LAYER_NAMES[theirs]}), which sits above it")
            if imp.target in modules:
                for n in imp.names:
                    if n.startswith("_") and not n.startswith("__") and f"{imp.target}.{n}" not in modules:
                        problems.append(f"{imp.where()}: private name {n} imported from {imp.target}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                problems.append(f"{os.path.relpath(path, root)}:{node.lineno}: private name {node.attr} used "
                                f"from {aliases[node.value.id]}")
    problems += find_cycles(graph)
    return problems


def find_cycles(graph: Dict[str, Dict[str, Import]]) -> List[str]:
    out, state, stack = [], {}, []

    def dfs(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                steps = " -> ".join(f"{a} ({graph[a][b].where()})" for a, b in zip(cycle, cycle[1:]))
                out.append(f"import cycle: {steps} -> {nxt}")
            elif nxt in graph and not state.get(nxt):
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for n in sorted(graph):
        if not state.get(n):
            dfs(n)
    return out


def test_the_import_graph_keeps_the_design():
    problems = find_violations(ROOT)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- the checks can fail


@pytest.fixture()
def tree_copy(tmp_path):
    for top in SCANNED:
        shutil.copytree(os.path.join(ROOT, top), tmp_path / top,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def plant(root, rel: str, text: str, top: bool = False) -> int:
    """Add `text` to a file (at the end, or after its docstring and __future__ import); return its line."""
    path = os.path.join(root, rel)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if top:
        at = next(i for i, l in enumerate(lines) if l.startswith("from __future__")) + 1
    else:
        at = len(lines)
    lines[at:at] = text.splitlines()
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return at + 1


def test_a_planted_cycle_is_named(tree_copy):
    line = plant(tree_copy, "engine/registry.py", "from engine.config import Problem", top=True)
    problems = find_violations(str(tree_copy))
    cycles = [p for p in problems if p.startswith("import cycle")]
    assert cycles, problems
    assert any(f"engine/registry.py:{line}" in p for p in cycles), cycles


def test_a_planted_upward_import_is_named(tree_copy):
    line = plant(tree_copy, "engine/data/mixing.py", "from engine.build import build_model  # noqa", top=True)
    problems = find_violations(str(tree_copy))
    assert any(p.startswith(f"engine/data/mixing.py:{line}: layer order") and "engine.build" in p
               for p in problems), problems


def test_a_planted_private_name_is_named(tree_copy):
    line = plant(tree_copy, "engine/trainer/schedule.py", "from engine.config import _fmt  # noqa", top=True)
    line2 = plant(tree_copy, "engine/trainer/schedule.py",
                  "import engine.config as cfg\n\n\ndef f():\n    return cfg._fmt(1)")
    problems = find_violations(str(tree_copy))
    assert any(p.startswith(f"engine/trainer/schedule.py:{line}: private name _fmt") for p in problems), problems
    assert any(p.startswith(f"engine/trainer/schedule.py:{line2 + 4}: private name _fmt") for p in problems), problems


def test_a_planted_function_import_without_a_reason_is_named(tree_copy):
    line = plant(tree_copy, "engine/trainer/schedule.py", "\n\ndef late():\n    import json\n    return json")
    problems = find_violations(str(tree_copy))
    assert any(p.startswith(f"engine/trainer/schedule.py:{line + 3}: import of json inside a function")
               for p in problems), problems


# --------------------------------------------------------------------------- recipe checks import nothing heavy

HEAVY = ("torch", "transformers", "deepspeed", "torchvision", "timm", "peft")


def test_a_recipe_error_is_reported_fast_without_heavy_imports(tmp_path):
    """The recipe is checked before anything heavy is imported (engine/train.py's promise): a typo is reported
    by the real entry point in well under 2 s, and validation itself leaves torch, transformers and
    deepspeed unimported."""
    import subprocess
    import sys
    import time

    env = dict(os.environ, PYTHONPATH=ROOT)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "engine", "train.py"), "--recipe",
                           os.path.join(ROOT, "recipes", "tiny_sherlock.yaml"), "--options", "run.init_lrr=1"],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    took = time.perf_counter() - start
    assert proc.returncode != 0
    assert "run.init_lrr" in proc.stderr + proc.stdout and "init_lr" in proc.stderr + proc.stdout
    assert took < 2.0, f"a recipe typo took {took:.2f} s to report"

    probe = (
        "import sys\n"
        "from engine.config import ConfigError, load_recipe\n"
        "try:\n"
        f"    load_recipe({os.path.join(ROOT, 'recipes', 'tiny_sherlock.yaml')!r}, options=['run.best_metric=Cider'])\n"
        "except ConfigError as e:\n"
        "    assert 'CIDEr' in str(e), str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        f"load_recipe({os.path.join(ROOT, 'recipes', 'tiny_sherlock.yaml')!r})\n"
        "from engine.registry import DATASETS, MODELS, PROCESSORS, TASKS\n"
        "assert MODELS.get('blip2_opt').zoo and DATASETS.get('sherlock').schema and TASKS.names()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"validation imported {out.stdout.strip()}"


def test_declared_metadata_matches_the_builders():
    """The catalogs describe the builders without importing them; here both are loaded and compared."""
    import inspect

    from engine.registry import DATASETS, MODELS, PROCESSORS, TASKS

    for entry in PROCESSORS:
        sig = inspect.signature(entry.obj)
        assert tuple(entry.params) == tuple(sig.parameters), entry.name
    for entry in MODELS:
        assert "model_type" in inspect.signature(entry.obj).parameters
    for entry in DATASETS:
        assert callable(entry.obj)
    for entry in TASKS:
        assert set(entry.metric_keys(type("Run", (), {"spice": False})())) <= set(entry.obj().metric_keys) | {"SPICE"}
