#!/usr/bin/env bash
# QAT step benchmark on one CUDA GPU with AMP (float16 autocast + GradScaler): FP32, labkit PACT/TQT 8/8 and
# torch.ao FakeQuantize, the CPU run's cases (width 0.35 and 1.0 at 32 px, 1.0 at 224 px, batch 32).
# UNTESTED: written without access to a GPU. Sized for well under 5 minutes on an A100/H100: 15 timed
# rounds per case at tens of ms per step, plus one fresh process per variant for the peak memory
# (torch.cuda.max_memory_allocated). Extra arguments are passed on, e.g.  bench/gpu.sh --compile
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: torch sees no CUDA device")'
exec python bench/qat_step.py --device cuda --amp --threads 4 --steps 15 --warmup 3 \
    --output "${OUTPUT:-bench/qat_step_gpu.json}" "$@"
