"""Where the time of a QAT training step goes: FP32 vs labkit PACT / TQT, CPU time on one thread.

    python bench/profile_step.py                  # MobileNetV2 0.35 at 32 px, batch 32 (qat_step.py's nets)
    python bench/profile_step.py --width 1.0 --size 224 --steps 2

CPU time of the main thread (``time.thread_time``) with one intra-op thread: on a shared machine it leaves out
the time the step waited for a core (wall-clock under load says little). Reported per step:
  * the step, per variant, and its ratio to FP32 (median over ``--steps`` steps after one warm-up step);
  * the quantizers' autograd functions (forward, backward: all fake-quant work), the controllers' per-batch
    hook (weight-bound refresh, adder eps sync), the TQT gradient normalisation, the optimizer step; calls per
    step and time per call;
  * inside the quantizer functions, the time per aten op (a dispatch mode times each op: it adds ~10 us per
    op, so small ops read high), ranked;
  * the fixed cost per quantizer: the same step at batch 1, whose tensors are tiny, minus FP32's.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import qat_step  # noqa: E402
from labkit.quant import controllers, functional, quantizers  # noqa: E402

FUNCTIONS = {"PACT": functional.PACTQuantFn, "TQT": functional.TQTQuantFn}


class _OpTimer(TorchDispatchMode):
    def __init__(self, acc: collections.Counter, calls: collections.Counter):
        super().__init__()
        self.acc, self.calls = acc, calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.thread_time()
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__ + ("(out=)" if kwargs and "out" in kwargs else "")
        self.acc[name] += time.thread_time() - t0
        self.calls[name] += 1
        return out


class Probe:
    """Times the quantizer functions, the controllers' batch hook, the normalisation, the optimizer step."""

    def __init__(self):
        self.acc, self.calls = collections.Counter(), collections.Counter()
        self.ops, self.op_calls = collections.Counter(), collections.Counter()
        self.by_op = False
        self._saved: list = []

    def _timed(self, owner, name: str, key: str, static: bool = False, ops: bool = False):
        fn = getattr(owner, name)
        self._saved.append((owner, name, owner.__dict__[name] if static else fn))

        def wrapper(*a, **k):
            t0 = time.thread_time()
            if ops and self.by_op:
                with _OpTimer(self.ops, self.op_calls):
                    out = fn(*a, **k)
            else:
                out = fn(*a, **k)
            self.acc[key] += time.thread_time() - t0
            self.calls[key] += 1
            return out

        setattr(owner, name, staticmethod(wrapper) if static else wrapper)

    def install(self, runner: qat_step.Runner) -> None:
        for tag, cls in FUNCTIONS.items():
            self._timed(cls, "forward", f"{tag} fake-quant forward", static=True, ops=True)
            self._timed(cls, "backward", f"{tag} fake-quant backward", static=True, ops=True)
        self._timed(controllers.PACTController, "step_pre_training_batch", "controllers: refresh + eps sync")
        self._timed(qat_step, "normalize_tqt_grads", "TQT gradient normalisation")
        self._timed(runner.opt, "step", "optimizer step")

    def remove(self) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()


def step_times(runners: dict[str, qat_step.Runner], steps: int) -> dict[str, list[float]]:
    """CPU seconds of ``steps`` steps per variant, the variants taking turns (one warm-up step each first)."""
    out: dict[str, list[float]] = {v: [] for v in runners}
    for rnd in range(steps + 1):
        for v, r in runners.items():
            t0 = time.thread_time()
            r.step()
            if rnd:
                out[v].append(time.thread_time() - t0)
    return out


def profile(args) -> None:
    variants = ("fp32", "pact", "tqt")
    runners = {v: qat_step.Runner(v, args.width, args.size, args.batch, "auto", torch.device("cpu"), False)
               for v in variants}
    times = step_times(runners, args.steps)
    print(f"MobileNetV2 {args.width} at {args.size} px, batch {args.batch}, 1 thread: CPU ms per step "
          f"(median of {args.steps} rounds) and the median of the per-round ratios to FP32")
    for v in variants:
        ratio = statistics.median(a / b for a, b in zip(times[v], times["fp32"]))
        print(f"  {v:5s} {statistics.median(times[v]) * 1e3:8.1f} ms  x{ratio:.3f}")
    for v in ("pact", "tqt"):
        probe = Probe()
        probe.install(runners[v])
        runners[v].step()
        probe.acc.clear(), probe.calls.clear()
        for _ in range(args.steps):
            runners[v].step()
        print(f"\n{v}: part, ms per step, calls per step, us per call")
        for key, t in probe.acc.most_common():
            n = probe.calls[key] / args.steps
            print(f"  {key:36s} {t / args.steps * 1e3:8.1f} {n:6.0f} {t / probe.calls[key] * 1e6:9.1f}")
        probe.by_op = True
        runners[v].step()
        print(f"{v}: aten ops inside the fake-quant functions, one step (ms, calls, us per call)")
        for name, t in probe.ops.most_common(args.ops):
            n = probe.op_calls[name]
            print(f"  {name:28s} {t * 1e3:7.2f} {n:5d} {t / n * 1e6:8.1f}")
        probe.remove()
    fixed = {v: qat_step.Runner(v, args.width, args.size, 1, "auto", torch.device("cpu"), False)
             for v in variants}
    small = {v: statistics.median(t) for v, t in step_times(fixed, args.steps).items()}
    n_quantizers = len(quantizers(fixed["pact"].net))
    for v in ("pact", "tqt"):
        extra = small[v] - small["fp32"]
        print(f"\nbatch 1: {v} {small[v] * 1e3:.1f} ms vs fp32 {small['fp32'] * 1e3:.1f} ms: "
              f"{extra * 1e3:.1f} ms of fixed cost per step, {extra / n_quantizers * 1e6:.0f} us for each "
              f"of the {n_quantizers} quantizers")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=0.35)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    p.add_argument("--ops", type=int, default=15, help="aten ops listed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    profile(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
