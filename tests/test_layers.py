"""The package's layers (docs/ARCHITECTURE.md, "Layers"): a module imports only modules of its own layer or a lower
one, no two modules import each other (directly or round a circle), and the planning modules the Snakefile imports
stay torch-free. Every import counts, also one inside a function: hiding an import in a function does not change
which layer depends on which."""
from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "distill_bench"

# lowest first; a module belongs to the first layer with a matching pattern (fnmatch over the dotted name)
LAYERS: list[tuple[str, list[str]]] = [
    ("leaf", ["distill_bench", "distill_bench.atomic", "distill_bench.defaults", "distill_bench.refs"]),
    ("energy", ["distill_bench.energy", "distill_bench.energy.*"]),
    ("planning", ["distill_bench.config", "distill_bench.config.load", "distill_bench.config.plan",
                  "distill_bench.config.preflight",
                  "distill_bench.config.snapshot", "distill_bench.hardware", "distill_bench.synthetic.ids",
                  "distill_bench.dpo.config", "distill_bench.models.vocab", "distill_bench.forecast"]),
    ("data", ["distill_bench.data", "distill_bench.data.io", "distill_bench.data.task", "distill_bench.data.preprocess",
              "distill_bench.artifacts"]),
    ("models", ["distill_bench.models", "distill_bench.models.build", "distill_bench.models.tokenizer",
                "distill_bench.models.random_checkpoint"]),
    ("engines", ["distill_bench.train", "distill_bench.train.collate", "distill_bench.train.head",
                 "distill_bench.train.budget", "distill_bench.train.speed", "distill_bench.train.varlen",
                 "distill_bench.train.optim", "distill_bench.train.step_clock", "distill_bench.train.trainer", "distill_bench.train.launch", "distill_bench.kd", "distill_bench.kd.cache",
                 "distill_bench.kd.loss", "distill_bench.kd.trainer", "distill_bench.dpo", "distill_bench.dpo.pairs",
                 "distill_bench.dpo.judges", "distill_bench.dpo.train", "distill_bench.generation",
                 "distill_bench.generation.*", "distill_bench.eval", "distill_bench.eval.scoring",
                 "distill_bench.eval.common", "distill_bench.eval.native", "distill_bench.eval.lm_eval_backend",
                 "distill_bench.synthetic", "distill_bench.synthetic.filters"]),
    ("stages", ["distill_bench.*.stage", "distill_bench.report", "distill_bench.report.rollup", "distill_bench.report.stats",
                "distill_bench.report.reconcile", "distill_bench.report.run_check",
                "distill_bench.report.compare", "distill_bench.report.html", "distill_bench.report.plots"]),
    ("entry", ["distill_bench.cli", "distill_bench.__main__", "distill_bench.stages", "distill_bench.*.cli",
               "distill_bench.report.wandb_log"]),
]
# inside the engines layer the train package's foundation sits below everything that trains
TRAIN_FOUNDATION = ["distill_bench.train.collate", "distill_bench.train.head", "distill_bench.train.budget",
                    "distill_bench.train.speed", "distill_bench.train.varlen", "distill_bench.train.optim",
                    "distill_bench.train.step_clock"]
# the Snakefile imports these at parse time: planning a grid must not pay for torch
PLANNING_IMPORTS = ["distill_bench.config", "distill_bench.hardware"]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file), resolved to modules, not names."""
    files = {module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:   # `import pkg.mod.attr` -> the module part
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    targets.add(name)
        graph[mod] = targets
    return graph


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise KeyError(module)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            if layer_of(t) > layer_of(mod):
                bad.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
            elif mod in TRAIN_FOUNDATION and t.startswith(PACKAGE + ".") and layer_of(t) == layer_of(mod) \
                    and t not in TRAIN_FOUNDATION:
                bad.append(f"{mod} (train foundation) imports {t}")
    return bad


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan). A package's ``__init__`` re-exporting its
    own submodules is not a circle: the submodule's import of a sibling only passes through the package."""
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


def test_every_module_has_a_layer():
    unplaced = []
    for mod in import_graph(ROOT):
        try:
            layer_of(mod)
        except KeyError:
            unplaced.append(mod)
    assert not unplaced, f"modules without a layer (add them to LAYERS and docs/ARCHITECTURE.md): {unplaced}"


def test_no_import_goes_upward():
    bad = upward_imports(import_graph(ROOT))
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_circles():
    assert import_circles(import_graph(ROOT)) == []


def test_planning_modules_do_not_import_torch():
    code = (f"import sys\nimport {', '.join(PLANNING_IMPORTS)}\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules)\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "", f"importing {PLANNING_IMPORTS} imported {out.stdout.strip()}"


def test_architecture_doc_lists_the_layers_in_order():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    picture = doc[doc.index("```\nentry"):]
    picture = picture[:picture.index("```", 3)]
    drawn = [line.split()[0] for line in picture.splitlines()
             if line[:1].isalpha() and line.split()[0] in {name for name, _ in LAYERS}]
    assert drawn == [name for name, _ in reversed(LAYERS)], "docs/ARCHITECTURE.md draws the layers top to bottom"


@pytest.fixture()
def toy_package(tmp_path):
    """A throwaway copy of the layer rules' shape: a leaf module importing a stage (upward), and a circle."""
    pkg = tmp_path / PACKAGE
    for sub in ("", "data", "kd"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "atomic.py").write_text("def f():\n    from distill_bench.kd.stage import g\n")
    (pkg / "kd" / "stage.py").write_text("from distill_bench.atomic import f\n")
    (pkg / "data" / "io.py").write_text("from distill_bench.data import task\n")
    (pkg / "data" / "task.py").write_text("from . import io\n")
    return tmp_path


def test_checker_catches_an_upward_import_hidden_in_a_function_and_a_circle(toy_package):
    graph = import_graph(toy_package)
    assert upward_imports(graph) == ["distill_bench.atomic (leaf) imports distill_bench.kd.stage (stages)"]
    circles = import_circles(graph)
    assert ["distill_bench.data.io", "distill_bench.data.task"] in circles
    assert ["distill_bench.atomic", "distill_bench.kd.stage"] in circles
