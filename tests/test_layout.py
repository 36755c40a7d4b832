"""The design card's import graph: a user can copy one file with at most ops.py beside it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"ops", "data", "toycity", "clouds", "refine", "generate", "evaluate", "runs", "preflight", "train",
           "demo"}
ALLOWED = {
    "ops": set(),
    "data": set(),
    "toycity": set(),
    "clouds": {"ops"},
    "refine": {"ops"},
    "generate": {"toycity"},
    "evaluate": {"data", "clouds"},
    "runs": {"ops", "data", "clouds", "refine", "evaluate"},  # train.py's run bookkeeping: never imports train
    "preflight": {"ops", "data", "clouds", "refine", "evaluate", "runs"},  # train.py's preflight checks
    "train": PROJECT - {"train"},  # demo only lazily, inside main (test_train_imports_demo_lazily)
    "demo": PROJECT - {"demo"},
}


def project_imports(path):
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT


def test_every_module_exists():
    missing = sorted(m for m in PROJECT if not (ROOT / f"{m}.py").exists())
    assert not missing, f"design card files missing: {missing}"


def test_imports_point_downward():
    for name, allowed in ALLOWED.items():
        path = ROOT / f"{name}.py"
        if path.exists():
            extra = project_imports(path) - allowed - {name}
            assert not extra, f"{name}.py imports {sorted(extra)}; the design card allows only {sorted(allowed)}"


def test_train_imports_demo_lazily():
    """demo.py imports train.py at module level, so train.py may import demo only inside a function (no cycle)."""
    tree = ast.parse((ROOT / "train.py").read_text())
    top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert "demo" not in top, "train.py imports demo at module level: import it inside main (demo.py imports train)"
