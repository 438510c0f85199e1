"""Time the per-layer sensitivity of the embedded FP32 run (PACT 4b config, 256 calibration images).

    python bench/sensitivity.py [--calib 256] [--out bench/sensitivity.json]

Measured in one process, nothing cached: ``loss`` with the bit-widths batched (every layer re-run once for
2 3 4 8, as labkit plan does), ``loss`` one bit-width per call (four calls: how it was measured before the
batching), and ``fisher``. Needs runs/embedded-fp32/best.ckpt (labkit train
configs/embedded/config.fp32.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from labkit.config.loading import load_config
from labkit.precision.bitplan import BitPlan
from labkit.precision.sensitivity import (
    DEFAULT_BITS,
    calibration_batch,
    checkpoint_file,
    float_weights_network,
    measure,
    measure_fisher,
)

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "bench" / "sensitivity.json"))
    args = parser.parse_args()
    cfg = load_config(ROOT / "configs" / "embedded" / "config.pact.4b.json")
    qnet = float_weights_network(cfg, checkpoint_file(cfg["network"]["pretrained"]))
    x, y = calibration_batch(cfg["data"], args.calib)
    plan = BitPlan(qnet, (1, *x.shape[1:]))
    seconds = {
        "loss, bit-widths batched": timed(lambda: measure(qnet, plan, x, y, DEFAULT_BITS)),
        "loss, one bit-width per call": timed(lambda: [measure(qnet, plan, x, y, (b,))
                                                       for b in DEFAULT_BITS]),
        "fisher": timed(lambda: measure_fisher(qnet, plan, x, y, DEFAULT_BITS)),
    }
    result = {"calib": len(x), "bits": list(DEFAULT_BITS), "threads": torch.get_num_threads(),
              "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "speedup of batching": round(seconds["loss, one bit-width per call"] /
                                           seconds["loss, bit-widths batched"], 2)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
