"""Training-step throughput of MobileNetV2 (forward + backward + SGD step), FP32 or a quantized config.

    python bench/train_throughput.py                       # width 0.35 and 1.0 at 32 px, 1.0 at 224 px
    python bench/train_throughput.py --config configs/embedded/config.pact.json --width 0.35 --size 32
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/train_throughput.py

Prints the median step time and images per second over ``--steps`` timed steps (after warm-up) and writes
the results as JSON (``--output``). Numbers, dates and machines go into bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch import nn

from labkit.models import MobileNetV2


def build(width: float, size: int, config_path: str | None) -> nn.Module:
    net = MobileNetV2(capacity=width, num_classes=1000, config="small" if size <= 64 else "standard")
    if config_path:
        from labkit.config import load_config
        from labkit.quant import get_pact_controllers
        from labkit.recipe import pact_recipe

        cfg = load_config(config_path, {"network.pretrained": None})
        net, _ = pact_recipe(net, cfg["network"]["quantize"])
        for controller in get_pact_controllers(net, {"linear": {"0": "start"}, "activation": {"0": "start"}}):
            controller.step_pre_training_epoch(0)
    return net


def time_steps(net: nn.Module, size: int, batch: int, steps: int, warmup: int, device: torch.device) -> list[float]:
    net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="quantized config whose network.quantize to apply (default: FP32)")
    parser.add_argument("--width", type=float, action="append", help="width multiplier(s)")
    parser.add_argument("--size", type=int, action="append", help="input size(s) in pixels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="bench/train_throughput.json")
    args = parser.parse_args()
    cases = [(w, s) for w in args.width for s in args.size] if args.width and args.size else \
        [(0.35, 32), (1.0, 32), (1.0, 224)]
    results = []
    for width, size in cases:
        torch.manual_seed(0)
        times = time_steps(build(width, size, args.config), size, args.batch, args.steps, args.warmup,
                           torch.device(args.device))
        median = statistics.median(times)
        results.append({"width": width, "size": size, "batch": args.batch, "median_step_s": median,
                        "images_per_s": args.batch / median})
        print(f"width {width:<4} {size:>3} px  batch {args.batch}: {median * 1000:8.1f} ms/step  "
              f"{args.batch / median:7.1f} img/s")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": args.device, "config": args.config or "fp32"}
    with open(args.output, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
