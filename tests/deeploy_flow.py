"""Deeploy's own test flow (v0.2.1 ``DeeployTest``: generateNetwork.py, its CMake project, its test harness)
on a labkit Deeploy export, and every logit it computes compared with ``outputs.npz``:

    python tests/deeploy_flow.py EXPORT_DIR FLOW [--chunk N] [--timeout S] [--json OUT.json]

FLOW (the runner is Deeploy's ``deeployRunner_generic.py`` or ``deeployRunner_cortexm.py``, toolchain GCC):

``generic``               Generic platform, host gcc, generateNetwork.py unmodified (it inserts
                          ``EmulateCMSISRequantPass``): what a user following Deeploy's instructions runs.
``generic-no-emulation``  the same with that one pass left out (deeploy_generate.py ``--no-emulation``).
``cmsis``                 the CMSIS (Cortex-M) platform unmodified: Deeploy's QEMU-ARM target (cortex-m4,
                          CMSIS-NN, Debian's arm-none-eabi-gcc and picolibc, qemu-system-arm mps2-an386 with
                          semihosting); for ``labkit export --target deeploy-cmsis`` exports.
``cmsis-rewritten``       the same (Deeploy unmodified) on a copy of a ``deeploy`` (Generic) export rewritten
                          by deeploy_graphs.for_cmsis for the CMSIS mapping (labkit.export.cmsis_graph).

Deeploy's harness compares each output with the golden data it was given (``testoutputs.h``, made from
``outputs.npz``) and prints every mismatch with its index (Generic: per int32 logit; QEMU-ARM: per byte); the
logits are rebuilt from those lines, and ``testoutputs.h`` is checked against ``outputs.npz``. The last stdout
line is a JSON summary. Needs deeploy_env's environment, source tree and (for cmsis) toolchain, and cmake,
ccache and gcc.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from deeploy_env import deeploy_python, picolibc_dir, require, source_dir  # noqa: E402
from deeploy_graphs import batch_of, for_cmsis, samples  # noqa: E402

#: flow: (Deeploy platform, runner, deeploy_generate.py options; None: the runner's own generation)
FLOWS = {
    "generic": ("Generic", "deeployRunner_generic.py", None),
    "generic-no-emulation": ("Generic", "deeployRunner_generic.py", ["--no-emulation"]),
    "cmsis": ("QEMU-ARM", "deeployRunner_cortexm.py", None),
    "cmsis-rewritten": ("QEMU-ARM", "deeployRunner_cortexm.py", None),
}


def input_type(export_dir: Path) -> list[str]:
    """labkit's input codes are int8 with offset 0 (as deeploy_codegen.py declares them): Deeploy's options
    for it, keyed by the input's name in ``inputs.npz`` (otherwise Deeploy infers the type from the
    values)."""
    with np.load(export_dir / "inputs.npz") as z:
        name = z.files[0]
    return ["--input-type-map", f"{name}=int8_t", "--input-offset-map", f"{name}=0"]


MISMATCH = re.compile(
    r"Expected:\s*(-?\d+)\s+Actual:\s*(-?\d+)\s+Diff:\s*-?\d+ at Index\s+(\d+) in Output (\d+)"
)
ERRORS = re.compile(r"Errors:\s*(\d+)\s*out\s*of\s*(\d+)")
STAGES = [
    ("Timed out after", "timeout (a board run that never ends: out of heap? use a smaller --chunk)"),
    ("Network generation failed", "generate"),
    ("CMake configuration failed", "configure"),
    ("Build failed", "build"),
]


def _environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{deeploy_python().parent}{os.pathsep}{env.get('PATH', '')}"  # the runner calls `python`
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int) -> str:
    """``cmd``'s output; after ``timeout`` seconds its whole process group (cmake, qemu) is ended."""
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            return proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.communicate()[0] + f"\nTimed out after {timeout} s\n"


def deeploy_run(export_dir: Path, flow: str, timeout: int = 1800) -> tuple[str, Path]:
    """Run ``flow`` on ``export_dir``; its output and Deeploy's generation folder for the export."""
    platform, runner, options = FLOWS[flow]
    require(
        "cmake",
        "ccache",
        "gcc",
        *(["arm-none-eabi-gcc", "qemu-system-arm"] if platform == "QEMU-ARM" else []),
    )
    test_dir = source_dir() / "DeeployTest"
    gen_dir = test_dir / f"TEST_{platform.upper()}" / export_dir.name
    toolchain = str(picolibc_dir()) if platform == "QEMU-ARM" else "/usr"
    env, log = _environment(), ""
    with open(test_dir / "labkit-flow.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # Deeploy's runner builds every test in one build folder
        runner_cmd = [
            str(deeploy_python()),
            runner,
            "-t",
            str(export_dir),
            "--toolchain",
            "GCC",
            "--toolchain-install-dir",
            toolchain,
            *input_type(export_dir),
        ]
        if options is not None:
            script = Path(__file__).with_name("deeploy_generate.py")
            log += _run(
                [
                    str(deeploy_python()),
                    str(script),
                    *options,
                    "generateNetwork.py",
                    "-d",
                    str(gen_dir),
                    "-t",
                    str(export_dir),
                    "-p",
                    platform,
                    *input_type(export_dir),
                ],
                test_dir,
                env,
                timeout,
            )
            if not (gen_dir / "Network.c").exists() or "Traceback" in log:
                return log + "\nNetwork generation failed\n", gen_dir
            runner_cmd.append("--skipgen")
        log += _run(runner_cmd, test_dir, env, timeout)
    return log, gen_dir


def golden_from_header(gen_dir: Path) -> np.ndarray:
    """``testOutputVector0`` of Deeploy's ``testoutputs.h`` (written by generateNetwork.py from
    outputs.npz)."""
    text = (gen_dir / "testoutputs.h").read_text()
    body = re.search(r"testOutputVector0\[\]\s*=\s*\{([^}]*)\}", text).group(1)
    return np.array([float(v) for v in body.split(",")], dtype=np.float64)


def logits_from_log(log: str, golden: np.ndarray, bytewise: bool) -> np.ndarray:
    """The int32 outputs the harness saw: the golden values with each reported mismatch put in."""
    out = golden.astype(np.int32).copy()
    view = out.view(np.uint8) if bytewise else out
    for expected, actual, index, _ in MISMATCH.findall(log):
        i = int(index)
        if bytewise:  # QEMU_ARM's harness compares `char`s, unsigned on ARM
            assert view[i] == int(expected) & 0xFF, (i, expected, view[i])
            view[i] = int(actual) & 0xFF
        else:
            assert view[i] == int(expected), (i, expected, view[i])
            view[i] = int(actual)
    return out


def _stage(log: str) -> str:
    return next((stage for marker, stage in STAGES if marker in log), "run")


def compare(export_dir: Path, flow: str, timeout: int = 1800, keep: bool = True) -> dict:
    """Run ``flow`` on the whole export; the measured result (see the module docstring). Without ``keep``,
    Deeploy's generation folder for it (C sources and Deeploy's graph states, ~30 MB) is deleted after."""
    log, gen_dir = deeploy_run(export_dir, flow, timeout)
    try:
        return _summary(export_dir, flow, log, gen_dir)
    finally:
        if not keep:
            shutil.rmtree(gen_dir, ignore_errors=True)


def _summary(export_dir: Path, flow: str, log: str, gen_dir: Path) -> dict:
    reported = ERRORS.search(log)
    with np.load(export_dir / "outputs.npz") as z:
        want = z[z.files[0]].astype(np.int64)
    summary = {"flow": flow, "samples": int(want.shape[0]), "logits": int(want.size)}
    if not reported:
        error = [ln for ln in log.splitlines() if "Error" in ln or "error" in ln][-3:]
        return {**summary, "completed": False, "stage": _stage(log), "error": error}
    golden = golden_from_header(gen_dir)[: want.size]
    got = (
        logits_from_log(log, golden, bytewise=FLOWS[flow][0] == "QEMU-ARM")
        .astype(np.int64)
        .reshape(want.shape)
    )
    diff = np.abs(got - want)
    return {
        **summary,
        "completed": True,
        "golden_is_outputs_npz": bool(np.array_equal(golden, want.ravel())),
        "reported_errors": int(reported.group(1)),
        "reported_total": int(reported.group(2)),
        "differing": int((diff > 0).sum()),
        "max_abs_diff": int(diff.max()),
        "argmax_agree": int((got.argmax(1) == want.argmax(1)).sum()),
        "logits_seen": got.tolist(),
    }


def compare_chunked(export_dir: Path, flow: str, chunk: int | None = None, timeout: int = 1800) -> dict:
    """``compare`` on slices of ``chunk`` samples (a Cortex-M board has 4 MB of RAM), results added up."""
    n = batch_of(export_dir)
    chunk = chunk or n
    with tempfile.TemporaryDirectory(prefix="labkit-deeploy-") as tmp:
        parts = []
        for start in range(0, n, chunk):
            source = export_dir
            if chunk < n:
                source = samples(
                    export_dir, Path(tmp) / f"{export_dir.name}-{start}", start, min(chunk, n - start)
                )
            if flow == "cmsis-rewritten":
                source = for_cmsis(source, Path(tmp) / f"{export_dir.name}-cmsis-{start}")
            parts.append(compare(source, flow, timeout, keep=source == export_dir))
            if not parts[-1]["completed"]:
                return {**parts[-1], "samples": n, "chunk_start": start}
    total = {
        "flow": flow,
        "samples": n,
        "logits": sum(p["logits"] for p in parts),
        "completed": True,
        "chunks": len(parts),
    }
    for key in ("reported_errors", "reported_total", "differing", "argmax_agree"):
        total[key] = sum(p[key] for p in parts)
    total["max_abs_diff"] = max(p["max_abs_diff"] for p in parts)
    total["golden_is_outputs_npz"] = all(p["golden_is_outputs_npz"] for p in parts)
    total["logits_seen"] = [row for p in parts for row in p["logits_seen"]]
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("flow", choices=sorted(FLOWS))
    parser.add_argument("--chunk", type=int, default=None, help="samples per Deeploy run (default: all)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per Deeploy run (process group)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary with every logit seen")
    args = parser.parse_args(argv)
    result = compare_chunked(args.export_dir.resolve(), args.flow, args.chunk, args.timeout)
    if args.json:
        args.json.write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "logits_seen"}))


if __name__ == "__main__":
    main()
