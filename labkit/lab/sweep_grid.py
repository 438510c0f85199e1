"""A sweep's grid and settings, read and checked without torch (the command line answers a typo at once).

A grid is ``{"algorithm": [...], "bits": [...], "budget": [...], "seed": [...]}``: one point per algorithm,
seed and either bits or budget. Each algorithm names a config ``<configs>/config.<algorithm>.json`` and the
notebook that trains it (TQT's for ``tqt*``, PACT's otherwise); a point's name is its run folder's.
"""

from __future__ import annotations

from pathlib import Path

from labkit.config.budget import (
    SENSITIVITY_METHOD,
    SENSITIVITY_METHODS,
    bit_choices,
    budget_slug,
    format_budget,
    parse_budget,
)
from labkit.config.errors import LabkitError
from labkit.config.paths import resolve
from labkit.lab.launchers import LAUNCHERS, SlurmOptions

GRID_KEYS = ("algorithm", "bits", "budget", "seed")
MAX_SEED = 2 ** 32 - 1
RUNNERS = ("notebook", "train")
TRAINING_NOTEBOOK = "03_pact_training"
TQT_NOTEBOOK = "04_tqt_training"


class SweepError(LabkitError, ValueError):
    """A sweep that cannot run as asked; the message names the grid point or setting and the fix."""


def expand_grid(grid: dict) -> list[dict]:
    """``{"algorithm": ["pact", "tqt"], "bits": [8], "budget": ["BOPs=uniform:3"], "seed": [0, 1]}`` -> one
    dict per combination of algorithm, seed and either bits or budget (budgets in canonical spelling)."""
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise SweepError(f"unknown sweep key(s) {sorted(unknown)}: a grid has {', '.join(GRID_KEYS)}")
    values = {k: grid.get(k) if isinstance(grid.get(k), list) else [grid[k]] for k in GRID_KEYS if k in grid}
    if not values.get("algorithm"):
        raise SweepError("the sweep grid needs at least one 'algorithm'")
    if not all(isinstance(a, str) and a.strip() for a in values["algorithm"]):
        raise SweepError(f"sweep algorithms {values['algorithm']}: give config names, e.g. pact or tqt.4b")
    if not values.get("bits") and not values.get("budget"):
        raise SweepError("the sweep grid needs at least one 'bits' (or 'budget')")
    for bits in values.get("bits", []):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise SweepError(f"sweep bits {bits!r}: use integers from 2 to 16")
    for seed in values.get("seed", [0]):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise SweepError(f"sweep seed {seed!r}: use integers from 0 to {MAX_SEED}")
    plans = [("bits", b) for b in values.get("bits", [])] + \
        [("budget", format_budget(parse_budget(b))) for b in values.get("budget", [])]
    return [{"algorithm": alg, key: value, "seed": seed}
            for alg in values["algorithm"] for key, value in plans for seed in values.get("seed", [0])]


def run_name(point: dict) -> str:
    if "budget" in point:
        return f"{point['algorithm']}-{budget_slug(parse_budget(point['budget']))}-s{point['seed']}"
    return f"{point['algorithm']}-w{point['bits']}a{point['bits']}-s{point['seed']}"


def algorithm_config(algorithm: str, data: str = "embedded", configs: str | Path | None = None) -> Path:
    """``<configs>/config.<algorithm>.json`` (``configs/<data>/`` by default), else a :class:`SweepError`
    naming the algorithms there."""
    folder = resolve(configs or f"configs/{data}").absolute()
    config = folder / f"config.{algorithm}.json"
    if not config.is_file():
        known = sorted(p.name[len("config."):-len(".json")] for p in folder.glob("config.*.json"))
        raise SweepError(f"no config {config} for sweep algorithm '{algorithm}': choose one of "
                         f"{', '.join(known) or '(none there)'} (or add {config.name} to {folder})")
    return config


def training_notebook(algorithm: str) -> str:
    """The notebook that trains ``algorithm``'s config: TQT's for ``tqt*``, PACT's otherwise."""
    return TQT_NOTEBOOK if algorithm.startswith("tqt") else TRAINING_NOTEBOOK


def slurm_options(launcher: str, section: dict | None, slurm, dry_run: bool) -> SlurmOptions | None:
    """The Slurm options of ``--launcher slurm`` (a grid file's section, then ``slurm``: a dict of the command
    line's or a :class:`SlurmOptions`); with another launcher, any of them is an error."""
    if launcher != "slurm":
        if section or slurm or dry_run:
            what = "--dry-run" if dry_run else "Slurm options"
            raise SweepError(f"{what} with --launcher {launcher}: they apply to --launcher slurm only")
        return None
    if isinstance(slurm, SlurmOptions):
        return slurm
    return SlurmOptions.from_section(section, **dict(slurm or {}))


def check_settings(*, epochs, calib, plan_bits, launcher: str, parallel, runner: str,
                   slurm: SlurmOptions | None, sensitivity: str = SENSITIVITY_METHOD,
                   probe: bool = True) -> tuple[int, ...]:
    """The sweep-wide settings; returns ``plan_bits`` as sorted distinct bit-widths."""
    for what, value, fix in (("--epochs", epochs, "every point trains at least one epoch: give 1 or more"),
                             ("--calib", calib, "budget plans measure on at least one image: give 1 or more "
                                                "(default 256)"),
                             ("--parallel", parallel, "give the number of local jobs at once (1 or more)")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepError(f"{what} {value!r}: {fix}")
    try:
        bits = bit_choices(plan_bits, "--plan-bits")
    except LabkitError as err:
        raise SweepError(str(err)) from None
    if not isinstance(probe, bool):
        raise SweepError(f"probe {probe!r}: give True (probe the candidate plans) or False")
    if sensitivity not in SENSITIVITY_METHODS:
        raise SweepError(f"sensitivity {sensitivity!r} is unknown: use {' or '.join(SENSITIVITY_METHODS)}")
    if launcher not in LAUNCHERS:
        raise SweepError(f"launcher {launcher!r} is unknown: use {' or '.join(LAUNCHERS)}")
    if runner not in RUNNERS:
        raise SweepError(f"runner {runner!r} is unknown: use notebook (the training notebook through "
                         "papermill) or train (what labkit train runs)")
    if slurm is not None and slurm.gpus > 1 and runner != "train":
        raise SweepError(f"--gpus {slurm.gpus} with the notebook runner would train on one GPU: use --runner "
                         "train (one process per GPU, DistributedDataParallel) or --gpus 1")
    return bits
