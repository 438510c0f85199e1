"""The C that Deeploy generates for a labkit export (``deeploy_codegen.py``), built with gcc against Deeploy's
Generic kernel library and run on the export's inputs.

The kernel library (``TargetLibraries/Generic``) is not in the ``deeploy-pulp`` wheel: :func:`generic_library`
extracts it at tag v0.2.1 from the git clone of pulp-platform/Deeploy that ``$LABKIT_DEEPLOY_GIT`` names (a
work tree or a bare repository; nothing is downloaded) and compiles it, with the flags of Deeploy's CMake for
Generic, into ``~/.cache/labkit/deeploy-generic-0.2.1`` (outside the repository). ``HARNESS`` (labkit's own)
loads the network, runs it on every batch of ``inputs.npz`` and writes the int32 logits.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnx

from deeploy_env import run_codegen

#: Deeploy's tag v0.2.1 (its ``Deeploy/`` package is the wheel's)
DEEPLOY_COMMIT = "44987d9fdc2af9cffced91823daede36fc9beab2"
#: Deeploy's CMake for the Generic platform compiles its library with these (docs/export.md)
CFLAGS = ("-std=gnu99", "-O2", "-DDEEPLOY_GENERIC_PLATFORM")

HARNESS = r"""
#include <string.h>
#include "Network.h"

/* argv: input codes (int8, n_batches * the network's input), output file (int32 logits), n_batches */
int main(int argc, char **argv) {
    if (argc != 4) return 2;
    long batches = atol(argv[3]);
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) return 3;
    InitNetwork(0, 1);
    for (long b = 0; b < batches; b++) {
        size_t bytes = DeeployNetwork_inputs_bytes[0];
        if (fread(DeeployNetwork_inputs[0], 1, bytes, in) != bytes)
            return 4;
        RunNetwork(0, 1);
        fwrite(DeeployNetwork_outputs[0], 1, DeeployNetwork_outputs_bytes[0], out);
    }
    fclose(in);
    fclose(out);
    return 0;
}
"""


class SourceMissing(RuntimeError):
    """Deeploy's source (for its C library) is not available here; the message says how to provide it."""


def _cache() -> Path:
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "labkit" / "deeploy-generic-0.2.1"
    )


def _extract(repo: str, dest: Path) -> None:
    git = ["git", "-C", repo] if Path(repo, ".git").exists() else ["git", "--git-dir", repo]
    found = subprocess.run([*git, "cat-file", "-t", DEEPLOY_COMMIT], capture_output=True, text=True)
    if found.stdout.strip() != "commit":
        raise SourceMissing(f"{repo} has no commit {DEEPLOY_COMMIT} (Deeploy v0.2.1): git fetch --tags there")
    # stderr: a partial clone names blobs outside TargetLibraries/Generic that it lacks, and still exits 0
    with subprocess.Popen([*git, "archive", "--format=tar", DEEPLOY_COMMIT, "--", "TargetLibraries/Generic"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as archive:
        with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
            tar.extractall(dest, filter="data")
    if archive.returncode:
        raise SourceMissing(f"git archive {DEEPLOY_COMMIT} failed in {repo}")


def generic_library() -> tuple[Path, Path]:
    """``(include folder, static library)`` of Deeploy v0.2.1's Generic kernels, built once into the cache."""
    dest = _cache()
    lib, inc = dest / "libdeeploy_generic.a", dest / "TargetLibraries" / "Generic" / "inc"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return inc, lib
        repo = os.environ.get("LABKIT_DEEPLOY_GIT")
        if not repo:
            raise SourceMissing("Deeploy's C kernels are not in its wheel: set LABKIT_DEEPLOY_GIT to a git "
                                "clone of pulp-platform/Deeploy with tag v0.2.1")
        shutil.rmtree(dest, ignore_errors=True)
        _extract(repo, dest)
        objects = []
        for src in sorted((dest / "TargetLibraries" / "Generic" / "src").glob("*.c")):
            obj = dest / "obj" / f"{src.stem}.o"
            obj.parent.mkdir(exist_ok=True)
            subprocess.run(["gcc", *CFLAGS, "-I", str(inc), "-c", str(src), "-o", str(obj)], check=True,
                           capture_output=True)
            objects.append(str(obj))
        subprocess.run(["ar", "rcs", str(lib.with_suffix(".tmp")), *objects], check=True)
        lib.with_suffix(".tmp").rename(lib)  # last: a half-built library is built again next time
    return inc, lib


def run_generated_c(export_dir: Path, c_dir: Path, cflags: tuple[str, ...] = ()) -> np.ndarray:
    """Build the C that ``deeploy_codegen.py`` wrote into ``c_dir`` with the Generic library and run it on
    every batch of ``inputs.npz``: the logits as int64, in the shape of ``outputs.npz``."""
    inc, lib = generic_library()
    (c_dir / "harness.c").write_text(HARNESS)
    exe = c_dir / "network"
    subprocess.run(["gcc", *CFLAGS, *cflags, "-I", str(c_dir), "-I", str(inc), str(c_dir / "Network.c"),
                    str(c_dir / "harness.c"), str(lib), "-lm", "-o", str(exe)], check=True,
                    capture_output=True)
    with np.load(export_dir / "inputs.npz") as f:
        codes = f["input"]
    with np.load(export_dir / "outputs.npz") as f:
        shape = f["output"].shape
    dims = onnx.load(str(export_dir / "network.onnx")).graph.input[0].type.tensor_type.shape.dim
    per_run = int(np.prod([d.dim_value for d in dims]))  # the network's (static) input
    (c_dir / "inputs.bin").write_bytes(codes.astype(np.int8).tobytes())
    subprocess.run([str(exe), str(c_dir / "inputs.bin"), str(c_dir / "logits.bin"),
                    str(codes.size // per_run)],
                   check=True, timeout=600)
    logits = np.fromfile(c_dir / "logits.bin", dtype=np.int32).astype(np.int64)
    return logits.reshape(shape)


def generate_and_run(export_dir: Path, work: Path) -> tuple[np.ndarray, dict]:
    """Deeploy's C for ``export_dir`` (``work/c``), built and run: ``(logits, Deeploy's JSON summary)``."""
    import json

    work.mkdir(parents=True, exist_ok=True)
    done = run_codegen(export_dir, work / "c")
    if done.returncode:
        raise RuntimeError(f"Deeploy could not generate C for {export_dir}:\n{done.stderr[-3000:]}")
    return run_generated_c(export_dir, work / "c"), json.loads(done.stdout.strip().splitlines()[-1])
