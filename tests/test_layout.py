"""The design card's house: the top level holds the paper's scripts and what they stand on; the toy world (toyworld/)
and the run machinery (runtools/) sit in packages; imports point downward, so a user can copy one file with at most
ops.py beside it (the model: clouds.py with ops.py and criterion.py; the refinement: refine.py with ops.py; ToyCity:
toyworld/city.py with parts.py, scene.py and paint.py beside it)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = {"ops", "data", "criterion", "backbones", "clouds", "checkpoints", "refine", "generate", "evaluate", "train"}
TOYWORLD = {f"toyworld.{m}" for m in ("parts", "scene", "paint", "city", "sam", "demo")}
RUNTOOLS = {f"runtools.{m}" for m in ("runs", "preflight", "train_config", "cli", "files")}
UTILS = {"runtools.cli", "runtools.files"}  # the bottom of the graph: they import no project file
PROJECT = TOP | TOYWORLD | RUNTOOLS
ALLOWED = {
    "runtools.files": set(),                       # the one atomic writer
    "runtools.cli": set(),                         # the one dataclass-to-argparse helper
    "ops": set(),
    "data": {"runtools.files"},
    "criterion": set(),                             # the matcher and losses: copyable alone
    "backbones": set(),                             # ViT backbones, Rein, LoRA (issue 19): copyable alone
    "clouds": {"ops", "criterion"},                 # needs ops.py and criterion.py beside it
    "checkpoints": {"clouds", "ops", "runtools.files"},  # needs clouds.py (and ops.py) beside it
    "refine": {"ops"},
    "generate": UTILS,
    "evaluate": {"data", "clouds", "checkpoints"} | UTILS,
    "train": TOP - {"train", "generate"} | RUNTOOLS,  # never the toy world
    "runtools.runs": {"ops", "data", "clouds", "checkpoints", "refine", "evaluate"} | UTILS,  # never train
    "runtools.preflight": {"ops", "data", "backbones", "clouds", "checkpoints", "refine", "evaluate", "runtools.runs"},
    "runtools.train_config": {"backbones", "clouds", "data", "runtools.cli"},
    "toyworld.parts": set(),                         # ToyCity's world: city.py needs its three files beside it
    "toyworld.scene": {"toyworld.parts"},
    "toyworld.paint": {"toyworld.parts"},
    "toyworld.city": {"toyworld.parts", "toyworld.scene", "toyworld.paint"} | UTILS,
    "toyworld.sam": {"ops", "refine"},
    "toyworld.demo": PROJECT - {"toyworld.demo"},
}
# Imports a file may make only inside a function, when the feature is asked for: refine.py still runs with only ops.py
# beside it (build_predictor("toy") imports the offline SAM stand-in; its CLI reads data.py's class names and colours
# and writes through runtools/files.py); ops.py's self-check CLI builds its flags with runtools/cli.py;
# clouds.py still copies with ops.py and criterion.py (a ViT backbone, issue 19, imports backbones.py when asked for);
# generate.py's offline backend is ToyCity's renderer.
LAZY = {"refine": {"toyworld.sam", "data"} | UTILS, "clouds": {"backbones"}, "generate": {"toyworld.city"},
        "ops": {"runtools.cli"}}


def path_of(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def project_imports(path, module_level=False):
    """Project modules (dotted) imported by the file (anywhere, or only outside function bodies with
    module_level=True)."""
    found, todo = set(), [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        todo.extend(ast.iter_child_nodes(node))
    return found & PROJECT


def test_the_top_level_holds_only_the_papers_scripts():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top == TOP, f"top-level .py files {sorted(top)}; the design card: {sorted(TOP)} (machinery goes into " \
                       f"runtools/, the toy world into toyworld/)"


def test_every_module_exists():
    missing = sorted(m for m in PROJECT if not path_of(m).exists())
    assert not missing, f"design card files missing: {missing}"


def test_imports_point_downward():
    for name, allowed in ALLOWED.items():
        extra = project_imports(path_of(name)) - allowed - LAZY.get(name, set()) - {name}
        assert not extra, f"{name} imports {sorted(extra)}; the design card allows only {sorted(allowed)}"


def test_lazy_imports_stay_inside_functions():
    for name, allowed in ALLOWED.items():
        extra = project_imports(path_of(name), module_level=True) - allowed - {name}
        assert not extra, (f"{name} imports {sorted(extra)} at module level; the design card allows "
                           f"{sorted(allowed)} there (and {sorted(LAZY.get(name, ()))} inside a function only)")


def test_train_knows_nothing_of_the_demo():
    text = path_of("train").read_text()
    assert "toyworld" not in text and "demo" not in text.lower(), "train.py mentions the demo or the toy world"


def test_no_reexports():
    """A name a module imports from a project module is not used by others through it (tests patch the real one):
    no `noqa: F401` re-export lists in the method scripts."""
    for name in TOP:
        text = path_of(name).read_text()
        assert "re-export" not in text and "F401" not in text, f"{name}.py re-exports names"
