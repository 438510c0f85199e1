"""The package reads as the pipeline it is (docs/architecture.md): one folder per stage, each importing only
earlier stages, directly or through a third; notebook-only helpers out of the integer and export paths; no
hidden (lazy) imports, no import-time side effects, torch-free config checking, short functions."""

import ast
import subprocess
import sys
from functools import cache

import pytest

from helpers import ROOT

PACKAGE = ROOT / "labkit"
#: the stages in pipeline order; a module may import its own stage and earlier ones only
STAGES = ("config", "models", "quant", "train", "precision", "integer", "export", "lab", "cli")
RANK = {name: i for i, name in enumerate(STAGES)}
#: the training loop and papermill: only these modules may reach them, directly or through others
TRAINER_USERS = {"labkit.lab.steps", "labkit.lab.widgets", "labkit.lab.sweep", "labkit.lab.sweep_check",
                 "labkit.lab.notebooks", "labkit.lab.probe", "labkit.cli"}
#: what `labkit integerize` and `labkit export` load: no trainer, no papermill
DEPLOY_PATH = ("labkit.lab.twins", "labkit.export", "labkit.integer")


def module_name(path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


@cache
def imports(module: str) -> frozenset[str]:
    """labkit modules and third-party top-level packages that ``module`` imports anywhere in its file."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = (
                [f"{node.module}.{a.name}" for a in node.names] if node.module.startswith("labkit") else []
            )
            out.update(n for n in names if n in MODULES)
            out.add(node.module if node.module in MODULES or not node.module.startswith("labkit")
                    else node.module.rsplit(".", 1)[0])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    resolved = set()
    for name in out:
        if name.startswith("labkit"):
            while name not in MODULES:
                name = name.rsplit(".", 1)[0]
            # a package's __init__ runs whenever one of its modules is imported
            parents = [".".join(name.split(".")[:i]) for i in range(2, name.count(".") + 1)]
            resolved.update([name, *[p for p in parents if p in MODULES]])
        else:
            resolved.add(name.split(".")[0])
    return frozenset(resolved - {module})


@cache
def closure(module: str) -> frozenset[str]:
    seen, todo = set(), [module]
    while todo:
        for dep in imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                if dep in MODULES:
                    todo.append(dep)
    return frozenset(seen)


def test_the_layout_is_the_stages():
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(s for s in STAGES if s != "cli")
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "cli.py"]
    for stage in folders:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())) or ""
        assert (
            doc.startswith("Stage ") and len(doc.splitlines()) == 1
        ), f"{stage}/__init__.py: one line on its job"


def test_no_two_modules_share_a_basename():
    names = [p.stem for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    names += [p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_pipeline(module):
    """Direct and transitive: no stage reaches a later one, whichever module it goes through."""
    rank = RANK.get(stage_of(module), 0)
    late = sorted(d for d in closure(module) if d.startswith("labkit.") and RANK[stage_of(d)] > rank)
    assert not late, f"{module} (stage {stage_of(module)}) reaches later stages: {late}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_lab_reaches_the_trainer_and_papermill(module):
    reached = closure(module) & {"labkit.train.loop", "papermill"}
    assert not reached or module in TRAINER_USERS | {
        "labkit.train.loop"
    }, f"{module} reaches {sorted(reached)}"


def test_integerize_and_export_load_neither_trainer_nor_papermill():
    code = (f"import sys; import {', '.join(DEPLOY_PATH)}; "
            "print(sorted(m for m in ('labkit.train.loop', 'papermill', 'labkit.lab.steps') if m in "
            "sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "labkit.cli"))
def test_no_unexplained_lazy_imports(module):
    """An import inside a function hides a dependency; outside the CLI each one says why on its line."""
    path = MODULES[module]
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    line = lines[inner.lineno - 1]
                    assert "# lazy:" in line, f"{path.relative_to(ROOT)}:{inner.lineno}: {line.strip()}"


def test_functions_are_short():
    """At most 60 lines per function (ruff's PLR0915 bounds the statements)."""
    long = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name}" for p in MODULES.values()
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long


def test_test_tooling_is_not_in_the_package():
    assert not list(PACKAGE.rglob("browser.py"))
    text = "".join(p.read_text() for p in MODULES.values())
    for name in ("random_torchvision_model", "default_quantize_config", "torch.compile"):
        assert name not in text, f"{name} is test or bench tooling: keep it in tests/ or bench/"


def test_importing_labkit_has_no_side_effects():
    """No optimizer hooks or other global registrations at import: a user's own optimizer steps untouched."""
    code = ("import torch, torch.optim.optimizer as o; before = (len(o._global_optimizer_pre_hooks), "
            "len(o._global_optimizer_post_hooks)); import labkit.cli, labkit.train.loop, labkit.lab.twins, "
            "labkit.lab.widgets; "
            "print(before == (len(o._global_optimizer_pre_hooks), len(o._global_optimizer_post_hooks)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_configs_are_checked_without_torch():
    code = ("import sys; from labkit.config import load_config; "
            "load_config('configs/imagenet/config.pact.json', check_files=False); print('torch' in "
            "sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
