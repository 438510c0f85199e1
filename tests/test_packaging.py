"""environment.yml (conda) must install what pyproject.toml declares: same names, same pins."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def requirement_key(spec: str) -> tuple[str, str]:
    name, pin = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", spec).groups()
    return name.lower().replace("_", "-"), pin.replace(" ", "")


def environment_pip_requirements() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\s*- pip:\s*$", line))
    reqs = []
    for line in lines[start + 1:]:
        m = re.match(r"^\s+- (.+?)\s*$", line)
        if not m:
            break
        reqs.append(m.group(1))
    return reqs


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    pip_reqs = environment_pip_requirements()
    assert "-e ." in pip_reqs, "environment.yml must install this package (- -e .)"
    env = sorted(requirement_key(r) for r in pip_reqs if r != "-e .")
    assert env == sorted(requirement_key(r) for r in declared)


def test_environment_yml_python_and_torch_pins():
    text = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s+- python=3\.11\s*$", text, re.M)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.14.1" in project["dependencies"] and "torchvision==0.29.1" in project["dependencies"]
