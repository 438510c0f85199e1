"""Deeploy's own virtual environment for the tests: ``deeploy-pulp`` pins numpy<2 and protobuf 4.23, which labkit's
environment cannot share. Made once with pip from PyPI (about 2 minutes, ~400 MB) and cached in
``$LABKIT_DEEPLOY_VENV`` or ``~/.cache/labkit/deeploy-<version>-py<X.Y>``; a later run reuses it."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: deeploy-pulp 0.2.1 and the versions its test was measured with (docs/export.md)
REQUIREMENTS = ("deeploy-pulp==0.2.1", "numpy==1.26.4", "onnx==1.17.0", "onnx-graphsurgeon==0.6.1",
                "onnxruntime==1.26.0", "protobuf==4.23.3", "ortools==9.7.2996", "mako==1.4.3")


def venv_dir() -> Path:
    if os.environ.get("LABKIT_DEEPLOY_VENV"):
        return Path(os.environ["LABKIT_DEEPLOY_VENV"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "labkit" / f"deeploy-0.2.1-py{sys.version_info.major}.{sys.version_info.minor}"


def deeploy_python() -> Path:
    """The Python of Deeploy's environment, made first when missing or made from other requirements."""
    venv = venv_dir()
    python, marker = venv / "bin" / "python", venv / "labkit-requirements.txt"
    wanted = "\n".join(REQUIREMENTS) + "\n"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time; the others wait and reuse it
        if marker.exists() and marker.read_text() == wanted and python.exists():
            return python
        if venv.exists() and any(venv.iterdir()) and not (venv / "labkit-made").exists():
            raise RuntimeError(f"{venv} exists and was not made by labkit's tests: remove it, or point "
                               "LABKIT_DEEPLOY_VENV at another folder")
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        (venv / "labkit-made").write_text("made by tests/deeploy_env.py; deleted and made again when outdated\n")
        log = venv.parent / f"{venv.name}.pip.log"
        with open(log, "w") as out:
            done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *REQUIREMENTS],
                                  stdout=out, stderr=subprocess.STDOUT)
        if done.returncode:
            tail = log.read_text().splitlines()[-5:]
            raise RuntimeError(f"pip could not install Deeploy into {venv} (log {log}):\n" + "\n".join(tail))
        marker.write_text(wanted)  # last: a half-made environment is made again next time
    return python


def run_codegen(export_dir: Path, out_dir: Path) -> subprocess.CompletedProcess:
    """``deeploy_codegen.py`` in Deeploy's environment (its stdout's last line: a JSON summary)."""
    script = Path(__file__).with_name("deeploy_codegen.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(deeploy_python()), str(script), str(export_dir), str(out_dir)], capture_output=True,
                          text=True, env=env, cwd=out_dir.parent, timeout=600)
