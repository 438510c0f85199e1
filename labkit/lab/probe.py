"""Plans chosen by a short QAT probe: the per-layer sensitivity proposes candidates, a short training decides
(in the lab: it trains).

**Why.** Over 11 plans of the embedded PACT 4b config (README, "Which sensitivity predicts QAT"), the
summed per-layer sensitivities order the plans' 6-epoch QAT results with Spearman 0.70 (``loss``) and 0.66
(``fisher``): both count 2-bit weights as costly, which QAT recovers (uniform W2/A4 trains to 98.3%), and
2-bit activations as cheap one at a time, while together they collapse (uniform W4/A2: 63.3%). The training
loss of a 2-epoch probe orders the same plans with Spearman 0.98.

**Candidates.** The exact allocation (:func:`labkit.precision.allocate.allocate`) under the budget for each
weight scale ``lam`` of :data:`WEIGHT_SCALES`, minimising ``lam * S_w + S_a`` (the weights' summed sensitivity
discounted by ``lam``: QAT retrains the weights, not the activations' grids); distinct plans only.

**Probe.** Each candidate's config trained :data:`PROBE_EPOCHS` epochs from the measured checkpoint, weights
and activations quantized from the first step, the base learning rate then x0.1 in the last epoch, the same
seed for every candidate, on at most ``images`` training images (all of the embedded set); the score is the
mean training loss of the last epoch (the validation split stays unseen). The candidate of least score wins;
a single candidate (every scale gives the same plan, as when no budget couples weights and activations) is
not probed.

Activation quantizers whose bounds start from statistics (``init_clip: max``) start before any were gathered
and take their constant bounds, as every candidate does alike.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labkit.config.budget import SENSITIVITY_METHOD
from labkit.config.tables import Table
from labkit.precision.allocate import Allocation, allocate, propose
from labkit.precision.sensitivity import DEFAULT_BITS
from labkit.train.loop import train

WEIGHT_SCALES = (1.0, 0.3, 0.1, 0.03, 0.01)
PROBE_EPOCHS = 2
PROBE_IMAGES = 4096


@dataclass
class Probed:
    """A candidate plan, its weight scale and its probe score (mean training loss of the last probe epoch)."""

    allocation: Allocation
    weight_scale: float
    score: float


def candidates(allocation_for: Callable[[float], Allocation],
               scales: tuple[float, ...] = WEIGHT_SCALES) -> list[tuple[float, Allocation]]:
    """``[(lam, allocation)]`` for each weight scale whose plan differs from those before it."""
    out: list[tuple[float, Allocation]] = []
    seen: list[tuple] = []
    for lam in scales:
        found = allocation_for(lam)
        bits = (sorted(found.plan.w_bits.items()), sorted(found.plan.a_bits.items()))
        if bits not in seen:
            seen.append(bits)
            out.append((lam, found))
    return out


def probe_config(cfg: dict, pretrained: str, epochs: int = PROBE_EPOCHS, images: int = PROBE_IMAGES) -> dict:
    """``cfg`` as a probe (module docstring): ``epochs`` epochs from ``pretrained``, every quantizer started
    at epoch 0, no freezes, the learning rate x0.1 in the last epoch, at most ``images`` training images."""
    probe = copy.deepcopy(cfg)
    probe["network"]["pretrained"] = pretrained
    training = probe["training"]
    training["n_epochs"] = epochs
    schedule = {"0": 1, str(epochs - 1): 0.1} if epochs > 1 else {"0": 1}
    training["gd"]["lr_sched"] = {"class": "HandScheduler", "kwargs": {"schedule": schedule}}
    kwargs = training.get("quantize", {}).setdefault("kwargs", {})
    kwargs["schedules"] = {kind: {"0": ["start"]} for kind in ("linear", "activation")}
    dataset = probe["data"].setdefault("train", {}).setdefault("dataset", {})
    dataset["limit"] = min(dataset.get("limit") or images, images)
    return probe


def probe_plans(found: list[tuple[float, Allocation]], pretrained: str, epochs: int = PROBE_EPOCHS,
                images: int = PROBE_IMAGES, device: str = "auto", log=print) -> list[Probed]:
    """Probe every candidate (in a temporary run folder each); returns them best first."""
    out = []
    with tempfile.TemporaryDirectory(prefix="labkit-probe-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no statistics were gathered")
        for i, (lam, allocation) in enumerate(found):
            cfg = probe_config(allocation.config(), pretrained, epochs, images)
            result = train(cfg, Path(tmp) / f"candidate-{i}", device=device, progress=False, log=None,
                           parameters={"probe": i, "weight_scale": lam}, tensorboard=False)
            out.append(Probed(allocation, lam, float(result["train"]["loss"])))
            if log:
                log(f"[probe] weight scale {lam:g}: {allocation.plan.describe()}, probe training loss "
                    f"{out[-1].score:.4f}")
    return sorted(out, key=lambda p: p.score)


def probe_table(probed: list[Probed]) -> Table:
    """One row per candidate, best first: weight scale, bits, totals, predicted increase, probe score."""
    rows = [{"weight scale": p.weight_scale, "plan": p.allocation.plan.describe(),
             **{k: p.allocation.totals[k] for k in p.allocation.budget},
             "predicted increase": p.allocation.objective, "probe loss": p.score} for p in probed]
    return Table(rows, title="candidate plans, best probe first")


def propose_probed(cfg: dict, budget, checkpoint: str | Path | None = None, bits=DEFAULT_BITS, w_bits=None,
                   a_bits=None, n_calib: int = 256, method: str = SENSITIVITY_METHOD, scales=WEIGHT_SCALES,
                   epochs: int = PROBE_EPOCHS, images: int = PROBE_IMAGES, device: str = "auto",
                   progress: bool = False, log=print) -> tuple[Allocation, list[Probed]]:
    """``(the chosen plan, every probed candidate best first)``: the candidates of the module docstring for
    ``budget`` (arguments as :func:`labkit.precision.allocate.propose`, which refuses an infeasible budget
    before measuring), each probed; the least probe loss wins."""
    first = propose(cfg, budget, checkpoint, bits, w_bits, a_bits, n_calib, progress, method)
    found = candidates(lambda lam: first if lam == 1 else allocate(first.plan, first.sensitivity, first.spec,
                                                                    w_bits, a_bits, weight_scale=lam), scales)
    if len(found) == 1:
        listed = ", ".join(f"{s:g}" for s in scales)
        first.chosen_by = f"; the same plan at every weight scale ({listed}): not probed"
        return first, []
    probed = probe_plans(found, first.sensitivity.checkpoint, epochs, images, device, log)
    best = probed[0].allocation
    best.chosen_by = (f"; chosen among {len(probed)} candidate plans (weight scales "
                      f"{', '.join(f'{p.weight_scale:g}' for p in probed)}) by the least training loss of a "
                      f"{epochs}-epoch QAT probe ({probed[0].score:.4f}; labkit.lab.probe)")
    return best, probed
