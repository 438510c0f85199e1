"""The package reads as the pipeline it is (../shared/DESIGN.md): each stage imports only earlier stages,
nothing imports the trainer to build a network, no hidden (lazy) imports, small modules, no import-time
side effects, torch-free config checking."""

import ast
import subprocess
import sys

import pytest

from helpers import ROOT

PACKAGE = ROOT / "labkit"
#: the stages in pipeline order; a module may import its own stage and earlier ones only
STAGES = [
    ("errors", "paths", "report", "spec", "progress"),
    ("schema", "config", "costs", "budget"),
    ("models",),
    ("checkpoint",),
    ("convert",),
    ("data",),
    ("quant",),
    ("fxops",),
    ("harmonize",),
    ("recipe",),
    ("build",),
    ("optim", "distributed"),
    ("runs",),
    ("train",),
    ("integer",),
    ("export",),
    ("bitwidths",),
    ("sensitivity",),
    ("allocate", "pareto"),
    ("lab",),
    ("deploy",),
    ("plots", "widgets"),
    ("sweep",),
    ("cli",),
]
RANK = {name: i for i, names in enumerate(STAGES) for name in names}
#: modules that may import the trainer (they train; they build nothing themselves)
TRAINER_USERS = {"lab", "deploy", "sweep", "cli"}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py" and rel.parent == rel.parent.parent:
            continue
        yield path, rel.parts[0].removesuffix(".py")


def labkit_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labkit"):
            parts = node.module.split(".")
            if len(parts) == 1:  # from labkit import x
                yield from ((node, alias.name) for alias in node.names)
            else:
                yield node, parts[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("labkit."):
                    yield node, alias.name.split(".")[1]


def test_every_module_has_a_stage():
    assert {stage for _, stage in modules()} <= set(RANK), "add new modules to STAGES"
    assert set(RANK) <= {stage for _, stage in modules()} | {"__init__"}


@pytest.mark.parametrize("path,stage", list(modules()), ids=lambda v: str(v) if isinstance(v, str) else v.name)
def test_imports_follow_the_pipeline(path, stage):
    tree = ast.parse(path.read_text())
    for node, target in labkit_imports(tree):
        if target == "__version__":
            continue
        assert target in RANK, f"{path}: imports unknown labkit module {target}"
        assert RANK[target] <= RANK[stage], (f"{path.relative_to(ROOT)}:{node.lineno} ({stage}, stage {RANK[stage]}) "
                                             f"imports {target} (stage {RANK[target]}), a later stage")
        if target == "train":
            assert stage in TRAINER_USERS, f"{path}: only {TRAINER_USERS} may import the trainer"


@pytest.mark.parametrize("path,stage", list(modules()), ids=lambda v: str(v) if isinstance(v, str) else v.name)
def test_no_unexplained_lazy_imports(path, stage):
    """An import inside a function hides a dependency; outside the CLI each one says why on its line."""
    if stage == "cli":
        return
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    line = lines[inner.lineno - 1]
                    assert "# lazy:" in line, f"{path.relative_to(ROOT)}:{inner.lineno}: {line.strip()}"


def test_modules_are_small():
    big = {str(p.relative_to(ROOT)): n for p, _ in modules() if (n := len(p.read_text().splitlines())) > 420}
    assert not big, big


def test_test_tooling_is_not_in_the_package():
    assert not (PACKAGE / "browser.py").exists()
    assert "random_torchvision_model" not in (PACKAGE / "convert.py").read_text()


def test_importing_labkit_has_no_side_effects():
    """No optimizer hooks or other global registrations at import: a user's own optimizer steps untouched."""
    code = ("import torch, torch.optim.optimizer as o; before = (len(o._global_optimizer_pre_hooks), "
            "len(o._global_optimizer_post_hooks)); import labkit.cli, labkit.train, labkit.deploy, labkit.widgets; "
            "print(before == (len(o._global_optimizer_pre_hooks), len(o._global_optimizer_post_hooks)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_configs_are_checked_without_torch():
    code = ("import sys; from labkit.config import load_config; "
            "load_config('configs/imagenet/config.pact.json', check_files=False); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
