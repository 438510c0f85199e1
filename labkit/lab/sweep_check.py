"""Every grid point of a sweep checked before the first one runs.

What each point will train is built as its job builds it (:func:`labkit.lab.steps.run_config`: the algorithm's
config, the point's bits, seed and epochs; the schema checks every value) and checked for what would only fail
later: the FP32 checkpoint it starts from (the embedded default's is trained first when missing), the ImageNet
folder, bits that the config's weight init rule cannot start (SAWB's coefficients stop at 8 bits), and each
budget against the cost model (``uniform:B`` resolved against the plan, no sensitivity measured): even the
cheapest plan of the allowed ``plan_bits`` must fit. The sweep's own settings (epochs, calibration images,
plan bits, launcher, runner, Slurm options) are checked before, without torch (:mod:`labkit.lab.sweep_grid`).
The first problem found raises :class:`SweepError`: one line naming the point and the fix.
"""

from __future__ import annotations

from pathlib import Path

from labkit.config.budget import parse_budget
from labkit.config.errors import LabkitError
from labkit.config.loading import load_config
from labkit.config.paths import resolve
from labkit.lab.steps import run_config
from labkit.lab.sweep_grid import SweepError
from labkit.precision.allocate import resolve_budget, uniform_totals
from labkit.precision.bitplan import BitPlan
from labkit.quant.init import SAWB_COEFFS
from labkit.train.build import build_network
from labkit.train.data import DatasetError, _split_folder
from labkit.train.evaluate import resolve_device

#: the largest SAWB table: weights that start by SAWB take at most this many bits
SAWB_MAX_BITS = max(SAWB_COEFFS).bit_length() - 1


def check_points(points: list[dict], configs: dict[str, Path], names: list[str], *, epochs: int,
                 data_root: str | None, pretrained: str | None, plan_bits: tuple[int, ...], device: str,
                 launcher: str) -> None:
    """Each point as its job will build it (module docstring); :class:`SweepError` names the first that fails.
    A local sweep's ``device`` must exist here (a Slurm job's is on its node)."""
    if launcher == "local":
        resolve_device(device)
    rules: dict[str, list[str]] = {}
    plans: dict[str, BitPlan] = {}
    for point, name in zip(points, names):
        algorithm = point["algorithm"]
        try:
            if algorithm not in rules:
                rules[algorithm] = _sawb_layers(configs[algorithm], data_root, pretrained)
            cfg = run_config(str(configs[algorithm]), data_root=data_root, epochs=epochs,
                             pretrained=pretrained, w_bits=point.get("bits"), a_bits=point.get("bits"),
                             seed=point["seed"])
            _check_inputs(cfg)
            bits = [point["bits"]] if "bits" in point else list(plan_bits)
            _check_sawb(rules[algorithm], bits, "bits" in point)
            if "budget" in point:
                if algorithm not in plans:
                    plans[algorithm] = BitPlan.from_config(cfg)
                _check_budget(plans[algorithm], point["budget"], plan_bits)
        except (LabkitError, ValueError) as err:
            said = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise SweepError(f"sweep point {name}: {said}") from None


def _sawb_layers(config: Path, data_root: str | None, pretrained: str | None) -> list[str]:
    """The weight layers of ``config`` whose bounds start by SAWB (their bits must have coefficients)."""
    overrides = {"data.root": data_root} if data_root else {}
    if pretrained:
        overrides["network.pretrained"] = str(resolve(pretrained))
    cfg = load_config(config, overrides, check_files=False)
    if not cfg["network"].get("quantize"):
        raise SweepError(f"config {config} has no network.quantize: a sweep point trains a PACT/TQT config "
                         "(e.g. configs/embedded/config.pact.json)")
    _, report = build_network(cfg, pretrained=False)
    return [row["name"] for row in report or [] if str(row.get("init_clip", "")).startswith("sawb")]


def _check_inputs(cfg: dict) -> None:
    """The checkpoint the point starts from, and the ImageNet folder it reads."""
    start = cfg["network"].get("pretrained")
    if start and not Path(start).is_file() and cfg["data"]["name"] != "embedded":
        raise SweepError(f"network.pretrained '{start}' not found: convert torchvision weights (labkit "
                         f"convert -o {start}), train the FP32 run first, or pass --pretrained")
    if cfg["data"]["name"] == "imagenet":
        try:
            for split in ("train", "val"):
                _split_folder(cfg["data"].get("root"), split)
        except DatasetError as err:
            raise SweepError(f"{err} (--data-root)") from None


def _check_sawb(sawb: list[str], bits: list[int], uniform: bool) -> None:
    lacking = [b for b in bits if 2 ** b not in SAWB_COEFFS]
    if sawb and lacking:
        what = f"bits {lacking[0]}" if uniform else f"--plan-bits {' '.join(map(str, lacking))}"
        raise SweepError(f"{what}: the weights of '{sawb[0]}' (and {len(sawb) - 1} more) start by SAWB, "
                         f"whose coefficients stop at {SAWB_MAX_BITS} bits; use bits up to {SAWB_MAX_BITS} "
                         "(or a config whose weights start by max)")


def _check_budget(plan: BitPlan, budget: str, plan_bits: tuple[int, ...]) -> None:
    """The cheapest plan of ``plan_bits`` (every layer at the fewest bits) must meet every limit."""
    limits = resolve_budget(plan, parse_budget(budget))
    cheapest = uniform_totals(plan, plan_bits[0], plan_bits[0])
    for metric, limit in limits.items():
        if cheapest[metric] > limit:
            raise SweepError(f"budget {metric} <= {limit:,} cannot be met: even every layer at "
                             f"{plan_bits[0]} bits costs {cheapest[metric]:,}; raise the budget or allow "
                             "fewer bits (--plan-bits)")
