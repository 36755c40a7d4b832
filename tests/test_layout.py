"""The design card's import graph: a user can copy one file with at most ops.py beside it (ToyCity, the offline world:
toycity.py with toyparts.py, toyscene.py and toypaint.py beside it; the model: clouds.py with ops.py and
criterion.py)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"ops", "data", "toyparts", "toyscene", "toypaint", "toycity", "toysam", "criterion", "backbones", "clouds",
           "checkpoints", "refine", "generate", "evaluate", "runs", "preflight", "train_config", "train", "demo"}
ALLOWED = {
    "ops": set(),
    "data": set(),
    "toyparts": set(),                              # ToyCity's world: toycity.py needs its three files beside it
    "toyscene": {"toyparts"},
    "toypaint": {"toyparts"},
    "toycity": {"toyparts", "toyscene", "toypaint"},
    "toysam": {"ops"},
    "criterion": set(),                             # the matcher and losses: copyable alone
    "backbones": set(),                             # ViT backbones, Rein, LoRA (issue 19): copyable alone
    "clouds": {"ops", "criterion"},                 # needs ops.py and criterion.py beside it
    "checkpoints": {"clouds", "ops"},  # needs clouds.py (and ops.py) beside it
    "refine": {"ops"},
    "generate": {"toycity"},
    "evaluate": {"data", "clouds", "checkpoints"},
    "runs": {"ops", "data", "clouds", "checkpoints", "refine", "evaluate"},  # train.py's run bookkeeping: never train
    "preflight": {"ops", "data", "backbones", "clouds", "checkpoints", "refine", "evaluate", "runs"},  # preflight
    "train_config": {"backbones", "clouds", "data", "refine", "runs"},  # train.py's flags, presets and parser
    "train": PROJECT - {"train"},  # demo only lazily, inside main (test_train_imports_demo_lazily)
    "demo": PROJECT - {"demo"},
}
# Imports a file may make only inside a function, when the feature is asked for: refine.py still runs with only ops.py
# beside it (build_predictor("toy") imports toysam.py, the offline stand-in for SAM); clouds.py still copies with
# ops.py and criterion.py (a ViT backbone, issue 19, imports backbones.py when asked for).
LAZY = {"refine": {"toysam"}, "clouds": {"backbones"}}


def project_imports(path, module_level=False):
    """Project modules imported by the file (anywhere, or only outside function bodies with module_level=True)."""
    found, todo = set(), [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        todo.extend(ast.iter_child_nodes(node))
    return found & PROJECT


def test_every_module_exists():
    missing = sorted(m for m in PROJECT if not (ROOT / f"{m}.py").exists())
    assert not missing, f"design card files missing: {missing}"


def test_imports_point_downward():
    for name, allowed in ALLOWED.items():
        path = ROOT / f"{name}.py"
        if path.exists():
            extra = project_imports(path) - allowed - LAZY.get(name, set()) - {name}
            assert not extra, f"{name}.py imports {sorted(extra)}; the design card allows only {sorted(allowed)}"


def test_lazy_imports_stay_inside_functions():
    for name, allowed in ALLOWED.items():
        path = ROOT / f"{name}.py"
        if path.exists():
            extra = project_imports(path, module_level=True) - allowed - {name}
            assert not extra, (f"{name}.py imports {sorted(extra)} at module level; the design card allows "
                               f"{sorted(allowed)} there (and {sorted(LAZY.get(name, ()))} inside a function only)")


def test_train_imports_demo_lazily():
    """demo.py imports train.py at module level, so train.py may import demo only inside a function (no cycle)."""
    tree = ast.parse((ROOT / "train.py").read_text())
    top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert "demo" not in top, "train.py imports demo at module level: import it inside main (demo.py imports train)"
