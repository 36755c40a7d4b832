"""The design card's import graph: a user can copy one file with at most ops.py beside it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = {"ops", "data", "toycity", "clouds", "checkpoints", "refine", "generate", "evaluate", "train"}
ALLOWED = {
    "ops": set(),
    "data": set(),
    "toycity": set(),
    "clouds": {"ops"},
    "checkpoints": {"clouds", "ops"},  # needs clouds.py (and ops.py) beside it
    "refine": {"ops"},
    "generate": {"toycity"},
    "evaluate": {"data", "clouds", "checkpoints"},
    "train": PROJECT - {"train"},
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
