"""Side-by-side QAT training-step benchmark: FP32, labkit PACT 8/8, labkit TQT 8/8, torch.ao FakeQuantize.

    python bench/qat_step.py                        # full run: width 0.35 and 1.0 at 32 px, 1.0 at 224 px
    python bench/qat_step.py --compile              # also the torch.compile'd quantizer kernels
    python bench/qat_step.py --quick                # smoke test (tiny batch, 2 steps, one case)
    python bench/qat_step.py --device cuda --amp    # what bench/gpu.sh runs

One training step = the controllers' per-batch hook (adder eps sync), forward, cross-entropy, zero_grad,
backward, optimizer step (SGD momentum 0.9, wd 4e-5; PACTSGD with clip decay for labkit's nets).

Variants, all built from the same seed (same weights, same batch):
  fp32       MobileNetV2 as is
  pact       labkit recipe, ``default_quantize_config(net, 8, 8)``: per-channel conv weights, learned
             PACT alphas on every ReLU6, harmonized adders and inserted quantizers, started at epoch 0
  tqt        the same with ``tqt=True`` (learned log2 thresholds everywhere, normalised before each step)
  torchao    PyTorch's own QAT fake quantization as a peer: ``torch.ao.nn.qat.Conv2d`` / ``Linear`` on the
             same convs and linear (x86 QAT qconfig: per-channel symmetric int8 weights) and its activation
             FakeQuantize after every ReLU6 (the places labkit's recipe quantizes, minus the adders: eager
             torch.ao would need FloatFunctional there)
  pact_compiled, tqt_compiled (``--compile``)  the labkit nets with bench/compiled_kernels.py's
             torch.compile'd quantizer kernels; compile time reported (first step minus the median)

Timing: all variants of a case live in one process and take turns, one step each per round, in a rotating
order, so load from other processes on a shared machine hits every variant alike. Reported: the median step
time, the ratio of medians to FP32 and the median of the per-round ratios (``paired_ratio``, robust to load
that drifts between rounds); the same for the process's CPU time per step (``cpu_paired_ratio``: with
``--threads 1`` it leaves out the time the step waited for a core, the better measure on a loaded machine);
the load average before and after each case shows contention.

Epochs (``--epochs N``): the embedded configs as ``labkit train`` runs them (FP32 from scratch, PACT and TQT
fine-tuning that FP32 run's checkpoint), ``N`` epochs each, ``--epoch-rounds`` rounds of fp32, pact, tqt;
reported per round: each variant's median epoch time from epoch 2 on (the ``seconds`` of history.jsonl, what
the lab console prints) and its ratio to FP32's in the same round.

Peak memory: measured in a fresh subprocess per variant (nothing else allocated in it): the CPU peak
resident set (``VmHWM``, reset right before the first step; it sees torch's CPU allocations, unlike
tracemalloc), both the whole process and the steps' increment above the resident set right before the
first step (model, optimizer and libraries excluded); on CUDA ``torch.cuda.max_memory_allocated``. Also
``saved_mb``: the bytes autograd keeps for backward in one forward (unique storages, via saved-tensor
hooks) - deterministic, explains the peaks.

Writes a JSON file (``--output``); numbers, dates and machines go into bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests", ROOT / "bench"):  # run from anywhere; tests/helpers builds the configs
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from labkit.models import MobileNetV2  # noqa: E402
from labkit.quant import normalize_tqt_grads  # noqa: E402

BASE_VARIANTS = ("fp32", "pact", "tqt", "torchao")
COMPILED_VARIANTS = ("pact_compiled", "tqt_compiled")
FULL_CASES = ((0.35, 32), (1.0, 32), (1.0, 224))
#: (max step-time ratio to FP32: issue 19, max peak-memory ratio to FP32: issue 6)
TARGETS = {"pact": (1.15, 1.10), "tqt": (1.25, 1.20)}
#: issue 19: max ratio of the median epoch (epochs 2 onward) to FP32's, embedded configs
EPOCH_TARGETS = {"pact": 1.15, "tqt": 1.25}


# ------------------------------------------------------------------------------------------------ building
def stride_table(size: int, table: str) -> str:
    """``auto``: the embedded default's ``small`` table (total stride 8) at <= 64 px, else ``standard``."""
    return table if table != "auto" else ("small" if size <= 64 else "standard")


def _torchao_swap(module: nn.Module, qconfig) -> None:
    """Convs/linears -> torch.ao.nn.qat modules (weight FakeQuantize); ReLU/ReLU6 -> (act, FakeQuantize)."""
    import torch.ao.nn.qat as nnqat

    for name, child in module.named_children():
        if type(child) in (nn.Conv2d, nn.Linear):
            child.qconfig = qconfig
            cls = nnqat.Conv2d if type(child) is nn.Conv2d else nnqat.Linear
            setattr(module, name, cls.from_float(child))
        elif isinstance(child, (nn.ReLU, nn.ReLU6)):
            setattr(module, name, nn.Sequential(child, qconfig.activation()))
        else:
            _torchao_swap(child, qconfig)


class Runner:
    """One variant: network, optimizer, controllers, batch; ``step()`` is one timed training step."""

    def __init__(self, variant: str, width: float, size: int, batch: int, table: str, device: torch.device,
                 amp: bool, seed: int = 0, channels_last: bool = True):
        self.variant, self.device, self.amp = variant, device, amp
        self.compiled = variant.endswith("_compiled")
        kind = variant.replace("_compiled", "")
        torch.manual_seed(seed)
        net = MobileNetV2(capacity=width, num_classes=1000, config=stride_table(size, table))
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 3, size, size, generator=gen).to(device)
        self.y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        self.controllers: list = []
        self.tqt: list = []
        if kind in ("pact", "tqt"):
            from labkit.quant import PACTSGD, get_pact_controllers, tqt_modules
            from labkit.quant.recipe import pact_recipe

            from helpers import default_quantize_config

            net, _ = pact_recipe(net, default_quantize_config(net, 8, 8, tqt=kind == "tqt"))
            net.to(device).train()
            with torch.no_grad():  # one calibration batch: activation statistics for init_clip "max"
                net(self.x)
            schedules = {"linear": {"0": "start"}, "activation": {"0": "start"}}
            self.controllers = get_pact_controllers(net, schedules)
            for c in self.controllers:
                c.step_pre_training_epoch(0)
            self.opt = PACTSGD(net, pact_decay=1e-3, lr=1e-3, momentum=0.9, weight_decay=4e-5)
            self.tqt = tqt_modules(net)  # log2 t gradients normalised before each step, as labkit's loop does
        else:
            if kind == "torchao":
                from torch.ao.quantization import get_default_qat_qconfig

                _torchao_swap(net, get_default_qat_qconfig("x86"))
            elif kind != "fp32":
                raise ValueError(f"unknown variant {variant!r}")
            net.to(device).train()
            self.opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=4e-5)
        if channels_last:  # as labkit's loop trains (training.channels_last): network and batch NHWC
            net.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.net = net
        self.scaler = torch.amp.GradScaler(device.type) if amp else None

    def _compile_mode(self):
        if not self.compiled:
            return contextlib.nullcontext()
        from compiled_kernels import compiled_kernels

        return compiled_kernels(True)

    def step(self) -> None:
        with self._compile_mode():
            for c in self.controllers:
                c.step_pre_training_batch()
            with torch.autocast(self.device.type, enabled=self.amp):
                loss = F.cross_entropy(self.net(self.x), self.y)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                if self.tqt:
                    self.scaler.unscale_(self.opt)
                    normalize_tqt_grads(self.tqt)
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                loss.backward()
                normalize_tqt_grads(self.tqt)
                self.opt.step()

    def timed_step(self) -> tuple[float, float]:
        """(wall, process CPU) seconds of one step."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self.step()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    def saved_bytes(self) -> int:
        """Bytes of the unique storages autograd saves for backward in one forward (then freed)."""
        seen: dict[tuple, int] = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                seen[(t.device.type, st.data_ptr())] = st.nbytes()
            except (RuntimeError, NotImplementedError):  # storage-less tensors
                pass
            return t

        with self._compile_mode(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(self.device.type, enabled=self.amp):
                loss = F.cross_entropy(self.net(self.x), self.y)
        params = {(p.device.type, p.untyped_storage().data_ptr()) for p in self.net.parameters()}
        total = sum(n for k, n in seen.items() if k not in params)
        del loss
        return total


# ------------------------------------------------------------------------------------------------ memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    """Reset this process's resident high-water mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(args) -> dict:
    """In a fresh process: peak memory of ``args.steps`` training steps of one variant.

    CPU: ``VmHWM`` (peak resident set of this process image; not ``ru_maxrss``, which a subprocess inherits
    from the parent it was forked from) after resetting it right before the first step, so the peak covers
    the training steps with the model, optimizer and libraries resident; ``rss_base_mb`` is the resident
    set at that moment and ``rss_step_mb`` the difference (the steps' own allocations)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    r = Runner(args.probe, args.width[0], args.size[0], args.batch, args.table, device, args.amp,
               channels_last=args.channels_last)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    base_kb = _status_kb("VmRSS")
    reset = _reset_hwm()
    for _ in range(args.probe_steps):
        r.step()
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss_peak_mb": peak_kb / 1024, "rss_base_mb": base_kb / 1024, "hwm_reset": reset}
    out["rss_step_mb"] = out["rss_peak_mb"] - out["rss_base_mb"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        out["cuda_step_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2 ** 20
    out["saved_mb"] = r.saved_bytes() / 2 ** 20
    return out


def run_probe(variant: str, width: float, size: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", variant, "--width", str(width), "--size",
           str(size), "--batch", str(args.batch), "--threads", str(args.threads), "--table", args.table,
           "--device", args.device, "--probe-steps", str(args.probe_steps)]
    cmd += (["--amp"] if args.amp else []) + ([] if args.channels_last else ["--contiguous"])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {variant} {width}/{size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ timing
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_case(width: float, size: int, variants: list[str], args) -> dict:
    device = torch.device(args.device)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    runners = {v: Runner(v, width, size, args.batch, args.table, device, args.amp,
                         channels_last=args.channels_last) for v in variants}
    build_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    warm: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(args.warmup + args.steps):
        order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
        for v in order:
            dt, dc = runners[v].timed_step()
            if rnd < args.warmup:
                warm[v].append(dt)
            else:
                times[v].append(dt)
                cpu[v].append(dc)
    load_after = os.getloadavg()
    out = {"width": width, "size": size, "table": stride_table(size, args.table), "batch": args.batch,
           "rounds": args.steps, "warmup": args.warmup, "build_s": build_s, "loadavg_before": load_before[0],
           "loadavg_after": load_after[0], "variants": {}}
    for v in variants:
        out["variants"][v] = _timing(times, cpu, warm, v, args.batch)
    del runners
    gc.collect()
    if args.memory:
        _memory(out, variants, width, size, args)
    return out


def _timing(times: dict, cpu: dict, warm: dict, v: str, batch: int) -> dict:
    med = _median(times[v])
    rec = {"median_s": med, "min_s": min(times[v]), "max_s": max(times[v]), "times_s": times[v],
           "cpu_s": cpu[v], "cpu_median_s": _median(cpu[v]), "warmup_s": warm[v], "images_per_s": batch / med}
    if "fp32" in times:
        rec["ratio"] = med / _median(times["fp32"])
        rec["paired_ratio"] = _median([a / b for a, b in zip(times[v], times["fp32"])])
        rec["cpu_paired_ratio"] = _median([a / b for a, b in zip(cpu[v], cpu["fp32"])])
    if v.endswith("_compiled") and warm[v]:
        rec["compile_s"] = warm[v][0] - med  # first call compiles the kernels (dynamic shapes: once)
    return rec


def _memory(out: dict, variants: list[str], width: float, size: int, args) -> None:
    for v in variants:
        out["variants"][v]["memory"] = run_probe(v, width, size, args)
    if "fp32" in variants:
        m0 = out["variants"]["fp32"]["memory"]
        for v in variants:
            m = out["variants"][v]["memory"]
            key = "cuda_peak_mb" if "cuda_peak_mb" in m else "rss_peak_mb"
            step_key = "cuda_step_mb" if "cuda_step_mb" in m else "rss_step_mb"
            m["peak_ratio"] = m[key] / m0[key]
            m["step_ratio"] = m[step_key] / m0[step_key]
            m["saved_ratio"] = m["saved_mb"] / m0["saved_mb"]


# ------------------------------------------------------------------------------------------------ epochs
def _train(variant: str, run: Path, fp32_ckpt: Path, epochs: int, env: dict) -> list[float]:
    """``labkit train`` of the embedded config ``variant`` into ``run``; each epoch's seconds."""
    config = ROOT / "configs" / "embedded" / f"config.{variant}.json"
    cmd = [sys.executable, "-m", "labkit.cli", "train", str(config), "-o", str(run), "--epochs", str(epochs),
           "--no-progress", "--overwrite"]
    if variant != "fp32":
        cmd += ["--pretrained", str(fp32_ckpt)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    return [json.loads(line)["seconds"] for line in (run / "history.jsonl").read_text().splitlines()]


def run_epochs(args) -> dict:
    """The embedded configs trained by ``labkit train`` in turn; median epoch (epochs 2 on) and its ratio."""
    import tempfile

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    rounds = []
    with tempfile.TemporaryDirectory(prefix="labkit-epochs-") as tmp:
        for r in range(args.epoch_rounds):
            rec = {"loadavg_before": os.getloadavg()[0]}
            for v in ("fp32", "pact", "tqt"):
                fp32_ckpt = Path(tmp) / f"fp32-{r}" / "best.ckpt"
                seconds = _train(v, Path(tmp) / f"{v}-{r}", fp32_ckpt, args.epochs, env)
                rec[v] = {"epochs_s": seconds, "median_s": _median(seconds[1:])}
            for v in ("pact", "tqt"):
                rec[v]["ratio"] = rec[v]["median_s"] / rec["fp32"]["median_s"]
            rec["loadavg_after"] = os.getloadavg()[0]
            rounds.append(rec)
            parts = [f"{v} {rec[v]['median_s']:.1f} s x{rec[v]['ratio']:.2f}" for v in ("pact", "tqt")]
            fp32 = rec["fp32"]["median_s"]
            head = f"round {r}: load {rec['loadavg_before']:.1f}; median epoch fp32 {fp32:.1f} s, "
            print(head + ", ".join(parts), flush=True)
    ratios = {v: _median([r[v]["ratio"] for r in rounds]) for v in EPOCH_TARGETS}
    targets = {v: {"ratio": r, "target": EPOCH_TARGETS[v]} for v, r in ratios.items()}
    return {"rounds": rounds, "targets": targets}


def check_targets(cases: list[dict]) -> dict:
    """Per target variant and case: time ratio (paired) and peak-memory ratio against issue 6's targets."""
    verdict: dict = {}
    for case in cases:
        for v, (t_max, m_max) in TARGETS.items():
            for name in (v, v + "_compiled"):
                rec = case["variants"].get(name)
                if rec is None:
                    continue
                mem = rec.get("memory", {})
                ratio = rec.get("paired_ratio", rec.get("ratio"))
                verdict.setdefault(name, []).append({
                    "case": f"{case['width']}/{case['size']}", "time_ratio": ratio, "time_target": t_max,
                    "time_ok": ratio <= t_max, "cpu_ratio": rec.get("cpu_paired_ratio"),
                    "peak_ratio": mem.get("peak_ratio"), "step_ratio": mem.get("step_ratio"),
                    "mem_target": m_max,
                    "mem_ok": None if "peak_ratio" not in mem else mem["peak_ratio"] <= m_max})
    return verdict


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--width", type=float, action="append", help="width multiplier (repeat; default 0.35 and 1.0)")
    add("--size", type=int, action="append", help="input size in px (repeat; pairs with --width)")
    add("--batch", type=int, default=32)
    add("--steps", type=int, default=None, help="timed rounds per case (default 7 at <= 64 px, 3 above)")
    add("--warmup", type=int, default=2, help="untimed rounds per case (the first compiles, if any)")
    add("--threads", type=int, default=min(2, os.cpu_count() or 1))
    add("--table", default="auto", choices=("auto", "small", "standard"),
        help="MobileNetV2 stride table (auto: small at <= 64 px, standard above)")
    add("--variants", default=",".join(BASE_VARIANTS), help="comma-separated subset of variants")
    add("--compile", action="store_true", help="add the torch.compile'd labkit variants")
    add("--device", default="cpu")
    add("--amp", action="store_true", help="autocast (float16 on CUDA, bfloat16 on CPU) + GradScaler")
    add("--contiguous", dest="channels_last", action="store_false",
        help="NCHW network and batch (default: channels_last, as training.channels_last trains)")
    add("--no-memory", dest="memory", action="store_false", help="skip the memory subprocesses")
    add("--probe-steps", type=int, default=2, help="training steps per memory probe")
    add("--quick", action="store_true", help="smoke test: width 0.35, 32 px, batch 4, 2 steps")
    add("--epochs", type=int, default=0, help="instead of steps: train the embedded configs this many epochs")
    add("--epoch-rounds", type=int, default=2, help="rounds of fp32, pact, tqt trainings with --epochs")
    add("--output", default=str(ROOT / "bench" / "qat_step.json"))
    add("--probe", help=argparse.SUPPRESS)  # internal: memory probe of one variant
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.compile:
        args.variants += [v for v in COMPILED_VARIANTS if v not in args.variants]
    unknown = set(args.variants) - set(BASE_VARIANTS) - set(COMPILED_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {BASE_VARIANTS + COMPILED_VARIANTS}")
    return args


def _cases(args) -> list[tuple[float, int]]:
    if args.quick:
        args.batch, args.warmup, args.probe_steps = 4, 1, 1
        args.steps = args.steps or 2
        return [(0.35, 32)]
    if args.width or args.size:
        return [(w, s) for w in args.width or [1.0] for s in args.size or [32]]
    return list(FULL_CASES)


def _print_case(rec: dict, args) -> None:
    print(f"\nwidth {rec['width']} {rec['size']} px ({rec['table']}), batch {args.batch}, "
          f"{rec['rounds']} rounds, load {rec['loadavg_before']:.2f} -> {rec['loadavg_after']:.2f}")
    for v, r in rec["variants"].items():
        line = (f"  {v:<14} {r['median_s'] * 1000:9.1f} ms  x{r.get('ratio', 1):.2f} (paired "
                f"x{r.get('paired_ratio', 1):.2f}; CPU {r['cpu_median_s'] * 1000:.1f} ms, paired "
                f"x{r.get('cpu_paired_ratio', 1):.2f})  [{r['min_s'] * 1000:.0f}-{r['max_s'] * 1000:.0f}]")
        if "compile_s" in r:
            line += f"  compile {r['compile_s']:.1f} s"
        m = r.get("memory")
        if m:
            key = "cuda_peak_mb" if "cuda_peak_mb" in m else "rss_peak_mb"
            step_key = "cuda_step_mb" if "cuda_step_mb" in m else "rss_step_mb"
            line += (f"  peak {m[key]:.0f} MB x{m['peak_ratio']:.2f}, step {m[step_key]:.0f} MB "
                     f"x{m['step_ratio']:.2f}, saved {m['saved_mb']:.0f} MB x{m['saved_ratio']:.2f}")
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(memory_probe(args)))
        return 0
    torch.set_num_threads(args.threads)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "device": args.device, "amp": args.amp, "batch": args.batch, "warmup": args.warmup,
            "steps": args.steps or "7 at <= 64 px, 3 above", "quick": args.quick, "variants": args.variants,
            "allocator": os.environ.get("LD_PRELOAD", "") or "default (glibc malloc on Linux)",
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    if args.epochs:
        out = {"meta": {**meta, "epochs": args.epochs, "epoch_rounds": args.epoch_rounds}, **run_epochs(args)}
    else:
        results = []
        for width, size in _cases(args):
            case_args = argparse.Namespace(**vars(args))
            case_args.steps = args.steps or (7 if size <= 64 else 3)
            results.append(run_case(width, size, args.variants, case_args))
            _print_case(results[-1], args)
        out = {"meta": meta, "cases": results, "targets": check_targets(results)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
