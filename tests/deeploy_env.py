"""Deeploy's own virtual environment for the tests: ``deeploy-pulp`` pins numpy<2 and protobuf 4.23, which
labkit's environment cannot share. Made once with pip from PyPI (about 2 minutes, ~400 MB) and cached in
``$LABKIT_DEEPLOY_VENV`` or ``~/.cache/labkit/deeploy-<version>-py<X.Y>``; a later run reuses it.

Deeploy's test flow (``DeeployTest/``, its CMake project and C libraries) is not in the wheel.
``source_dir()`` extracts it, at tag v0.2.1 with CMSIS-NN at the commit of its submodule, from two git
repositories that the environment names (``$LABKIT_DEEPLOY_GIT``: a clone of pulp-platform/Deeploy;
``$LABKIT_CMSIS_NN_GIT``: a clone of ARM-software/CMSIS-NN) into the cache, outside the repository; nothing is
downloaded. ``picolibc_dir()`` lays out Debian's picolibc (``apt-get install picolibc-arm-none-eabi``) as
Deeploy's Cortex-M CMake expects it."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

#: deeploy-pulp 0.2.1 and the versions its test was measured with (docs/export.md)
REQUIREMENTS = ("deeploy-pulp==0.2.1", "numpy==1.26.4", "onnx==1.17.0", "onnx-graphsurgeon==0.6.1",
                "onnxruntime==1.26.0", "protobuf==4.23.3", "ortools==9.7.2996", "mako==1.4.3")


#: Deeploy's tag v0.2.1 (the wheel's ``Deeploy/`` package is identical to it) and the CMSIS-NN commit of its
#: submodule ``TargetLibraries/CMSIS/third_party/CMSIS-NN`` (v6.0.0-3, 2024-07-11)
DEEPLOY_COMMIT = "44987d9fdc2af9cffced91823daede36fc9beab2"
CMSIS_NN_COMMIT = "9d924bdaee51ca8e0c4e86779bbb6d0c9644e555"
CMSIS_NN_PATH = "TargetLibraries/CMSIS/third_party/CMSIS-NN"
#: Deeploy's Cortex-M build: cmake/cmsis/cmsis.cmake (cortex-m4, fpv4-sp-d16, soft float ABI)
CORTEX_M_FLAGS = ("-mthumb", "-mcpu=cortex-m4", "-mfpu=fpv4-sp-d16", "-mfloat-abi=soft")
PICOLIBC = Path("/usr/lib/picolibc/arm-none-eabi")


class ToolMissing(RuntimeError):
    """A program, package or source that a Deeploy flow needs is missing here (the message says which)."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "labkit"


def venv_dir() -> Path:
    if os.environ.get("LABKIT_DEEPLOY_VENV"):
        return Path(os.environ["LABKIT_DEEPLOY_VENV"])
    return cache_dir() / f"deeploy-0.2.1-py{sys.version_info.major}.{sys.version_info.minor}"


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
        made = "made by tests/deeploy_env.py; deleted and made again when outdated\n"
        (venv / "labkit-made").write_text(made)
        log = venv.parent / f"{venv.name}.pip.log"
        with open(log, "w") as out:
            done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                                  *REQUIREMENTS], stdout=out, stderr=subprocess.STDOUT)
        if done.returncode:
            tail = log.read_text().splitlines()[-5:]
            raise RuntimeError(f"pip could not install Deeploy into {venv} (log {log}):\n" + "\n".join(tail))
        marker.write_text(wanted)  # last: a half-made environment is made again next time
    return python


def run_codegen(export_dir: Path, out_dir: Path) -> subprocess.CompletedProcess:
    """``deeploy_codegen.py`` in Deeploy's environment (its stdout's last line: a JSON summary)."""
    script = Path(__file__).with_name("deeploy_codegen.py")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(deeploy_python()), str(script), str(export_dir), str(out_dir)],
                          capture_output=True, text=True, env=env, cwd=out_dir.parent, timeout=600)


def require(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise ToolMissing(f"{', '.join(missing)} not found: apt-get install cmake ccache gcc "
                          "gcc-arm-none-eabi picolibc-arm-none-eabi qemu-system-arm")


def _git_archive(repo: str, commit: str, dest: Path, *pathspec: str) -> None:
    """Extract ``commit`` of the git repository ``repo`` (a work tree or a bare one) into ``dest``."""
    git = ["git", "-C", repo] if Path(repo, ".git").exists() else ["git", "--git-dir", repo]
    found = subprocess.run([*git, "cat-file", "-t", commit], capture_output=True, text=True)
    if found.stdout.strip() != "commit":
        raise ToolMissing(f"{repo} has no commit {commit}: fetch it (git fetch --tags) or name another clone")
    dest.mkdir(parents=True, exist_ok=True)
    # stderr: git names blobs of the excluded paths that a partial clone lacks, and still exits 0
    with subprocess.Popen([*git, "archive", "--format=tar", commit, "--", *pathspec],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as archive:
        with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
            tar.extractall(dest, filter="data")
    if archive.returncode:
        raise ToolMissing(f"git archive {commit} failed in {repo} (is every file of the commit there?)")


def source_dir() -> Path:
    """Deeploy v0.2.1's source tree with CMSIS-NN in its submodule folder, extracted once into the cache from
    the clones named by ``$LABKIT_DEEPLOY_GIT`` and ``$LABKIT_CMSIS_NN_GIT`` (a work tree or a bare repository
    each). Deeploy's own test models (``DeeployTest/Tests/Models``, git LFS data) are left out."""
    repos = {k: os.environ.get(k) for k in ("LABKIT_DEEPLOY_GIT", "LABKIT_CMSIS_NN_GIT")}
    dest = cache_dir() / "deeploy-src-0.2.1"
    marker, wanted = dest / "labkit-source.txt", f"{DEEPLOY_COMMIT}\n{CMSIS_NN_COMMIT}\n"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / "deeploy-src-0.2.1.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == wanted:
            return dest
        if not all(repos.values()):
            raise ToolMissing("Deeploy's test flow needs its source: set LABKIT_DEEPLOY_GIT to a git clone "
                              "of pulp-platform/Deeploy (with tag v0.2.1) and LABKIT_CMSIS_NN_GIT to one of "
                              "ARM-software/CMSIS-NN")
        shutil.rmtree(dest, ignore_errors=True)
        _git_archive(repos["LABKIT_DEEPLOY_GIT"], DEEPLOY_COMMIT, dest, ".", ":!DeeployTest/Tests/Models")
        _git_archive(repos["LABKIT_CMSIS_NN_GIT"], CMSIS_NN_COMMIT, dest / CMSIS_NN_PATH)
        marker.write_text(wanted)  # last: a half-made tree is made again next time
    return dest


def picolibc_dir() -> Path:
    """``TOOLCHAIN_INSTALL_DIR`` for Deeploy's ``cmake/cmsis/toolchain_gcc.cmake``: it reads
    ``picolibc/arm/{include,lib}`` and links ``-Tpicolibc.ld -lcrt0-semihost -lsemihost -lc -lm``. Made of
    links to Debian's picolibc for the cortex-m4 soft-float multilib, and ``libcrt0-semihost.a`` holding
    Debian's ``crt0-semihost.o`` (Debian ships the object, Deeploy's toolchain the archive)."""
    require("arm-none-eabi-gcc", "arm-none-eabi-ar")
    multilib = subprocess.run(["arm-none-eabi-gcc", *CORTEX_M_FLAGS, "-print-multi-directory"], check=True,
                              capture_output=True, text=True).stdout.strip()
    lib = PICOLIBC / "lib" / multilib
    if not (lib / "crt0-semihost.o").exists():
        raise ToolMissing(f"{lib}/crt0-semihost.o not found: apt-get install picolibc-arm-none-eabi")
    dest = cache_dir() / f"picolibc-{multilib.replace('/', '-')}"
    out = dest / "picolibc" / "arm"
    (out / "lib").mkdir(parents=True, exist_ok=True)
    if not (out / "include").exists():
        (out / "include").symlink_to(PICOLIBC / "include")
    links = {"libc.a": lib / "libc.a", "libm.a": lib / "libm.a", "libsemihost.a": lib / "libsemihost.a",
             "picolibc.ld": PICOLIBC / "lib" / "picolibc.ld"}
    for name, target in links.items():
        if not (out / "lib" / name).exists():
            (out / "lib" / name).symlink_to(target)
    crt0 = out / "lib" / "libcrt0-semihost.a"
    if not crt0.exists():
        subprocess.run(["arm-none-eabi-ar", "rcs", str(crt0), str(lib / "crt0-semihost.o")], check=True)
    return dest
