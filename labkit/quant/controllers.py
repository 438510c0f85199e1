"""Epoch-schedule controllers for quantizers (facts §2).

A schedule maps epochs (str or int) to a command or a list of commands, e.g.
``{"0": ["start", "verbose_on"], "4": "freeze"}``. ``step_pre_training_epoch(e)`` applies, in epoch order,
every scheduled command with ``last_epoch < epoch <= e`` (so skipped epochs are caught up) and records
``last_epoch``; within one epoch ``verbose_on``/``verbose_off`` go first. While verbose, each command is reported
as one line to ``log`` (per-layer bounds too when ``detail`` is set) and kept, with every quantizer's bounds, in
``events`` (the trainer writes them to the run folder). Commands are idempotent (``start`` on a started quantizer keeps its bounds), so re-applying a
schedule to a net restored from a checkpoint reproduces the uninterrupted run's module state.
The activation controller also covers the adders' quantizers and calls every adder's ``sync_eps`` after its
commands, before every training batch and before validation. At the same points the linear controller
re-derives the weight bounds that are not learned from the current weights (``refresh_bounds``: started, not
frozen, ``learn_clip`` false), so that they follow the weights as in the reference.
"""

from __future__ import annotations

from torch import nn

from labkit.config.schema import COMMANDS
from labkit.quant.acts import PACTIntegerAdd, _ActQuantizer
from labkit.quant.base import QuantizerBase
from labkit.quant.layers import _WeightQuantizer, refresh_weight_bounds

START_KWARGS = ("init_clip_hi", "init_clip_lo")


def parse_schedule(schedule: dict | None, what: str = "schedule") -> dict[int, list[str]]:
    """``{"0": ["start"], "4": "freeze"}`` -> ``{0: ["start"], 4: ["freeze"]}``; validates commands."""
    out: dict[int, list[str]] = {}
    for key, cmds in (schedule or {}).items():
        try:
            epoch = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: epoch key {key!r} is not an integer") from None
        cmds = [cmds] if isinstance(cmds, str) else list(cmds)
        for c in cmds:
            if c not in COMMANDS:
                raise ValueError(f"{what}[{key!r}]: unknown command {c!r}; allowed: {', '.join(COMMANDS)}")
        out.setdefault(epoch, []).extend(cmds)
    return dict(sorted(out.items()))


class PACTController:
    """Drives a set of quantizers (``[(name, module)]``) by an epoch schedule; ``start_kwargs`` go to ``start``."""

    def __init__(self, modules: list[tuple[str, QuantizerBase]], schedule: dict | None, adders=(),
                 name: str = "quantizers", **start_kwargs):
        for k in start_kwargs:
            if k not in START_KWARGS:
                raise TypeError(f"{name} controller: unknown keyword {k!r}; allowed: {', '.join(START_KWARGS)}")
        self.modules = list(modules)
        self.adders = list(adders)
        self.weight_quantizers = [m for _, m in self.modules if isinstance(m, _WeightQuantizer)]
        self.name = name
        self.schedule = parse_schedule(schedule, f"{name} schedule")
        self.start_kwargs = start_kwargs
        self.last_epoch = -1
        self.verbose = False
        self.log = print  # one line per reported command
        self.detail = False  # also log every quantizer's lo/hi/eps
        self.events: list[dict] = []  # reported commands with every quantizer's bounds, oldest first
        self.epoch: int | None = None  # the scheduled epoch whose commands are being applied

    # ------------------------------------------------------------------ commands
    def apply(self, command: str) -> None:
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
        if command in ("verbose_on", "verbose_off"):
            self.verbose = command == "verbose_on"
            for _, m in self.modules:
                m.verbose = self.verbose
            return
        for _, m in self.modules:
            if command == "start":
                m.start(**self.start_kwargs)
            else:
                getattr(m, command)()
        if command == "start":
            self.sync()
        if self.verbose:
            self._report(command)

    def _report(self, command: str) -> None:
        rows = [{"name": n, **m.quant_summary()} for n, m in self.modules]
        self.events.append({"epoch": self.epoch, "controller": self.name, "command": command,
                            "quantizers": rows})
        eps = [r["eps"] for r in rows] or [float("nan")]
        self.log(f"[{self.name} controller] {command}: {len(rows)} quantizers, eps {min(eps):.3g} .. {max(eps):.3g}")
        if self.detail:
            for r in rows:
                self.log(f"  {r['name']}: lo={r['lo']:.5g} hi={r['hi']:.5g} eps={r['eps']:.5g} "
                         f"n_levels={r['n_levels']}")

    def sync(self) -> None:
        """Adder eps sync and weight-bound refresh (what must hold before every forward)."""
        for a in self.adders:
            a.sync_eps()
        refresh_weight_bounds(self.weight_quantizers)

    # ------------------------------------------------------------------ trainer hooks
    def step_pre_training_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        for e, cmds in self.schedule.items():
            if self.last_epoch < e <= epoch:
                self.epoch = e
                # verbose_on/off first, so that the same epoch's other commands are reported
                for c in sorted(cmds, key=lambda c: not c.startswith("verbose")):
                    self.apply(c)
        self.last_epoch = max(self.last_epoch, epoch)

    def step_pre_training_batch(self) -> None:
        self.sync()

    def step_pre_validation_epoch(self, epoch: int | None = None) -> None:
        self.sync()

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "verbose": self.verbose,
                "schedule": {str(k): v for k, v in self.schedule.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state.get("last_epoch", -1))
        self.apply("verbose_on" if state.get("verbose", False) else "verbose_off")


def get_pact_controllers(net: nn.Module, schedules: dict, kwargs_linear: dict | None = None,
                         kwargs_activation: dict | None = None) -> list[PACTController]:
    """Controllers for ``schedules = {"linear": {...}, "activation": {...}}`` (either key may be missing):
    ``linear`` drives PACTConv2d/PACTLinear weight quantizers; ``activation`` drives activation quantizers
    (adders' included) and syncs adder eps. ``kwargs_*`` (``init_clip_hi``/``init_clip_lo``) go to ``start``."""
    schedules = dict(schedules or {})
    unknown = set(schedules) - {"linear", "activation"}
    if unknown:
        raise ValueError(f"schedules: unknown key(s) {sorted(unknown)}; allowed: 'linear', 'activation'")
    named = [(n, m) for n, m in net.named_modules() if isinstance(m, QuantizerBase)]
    out = []
    if "linear" in schedules:
        mods = [(n, m) for n, m in named if isinstance(m, _WeightQuantizer)]
        out.append(PACTController(mods, schedules["linear"], name="linear", **dict(kwargs_linear or {})))
    if "activation" in schedules:
        mods = [(n, m) for n, m in named if isinstance(m, _ActQuantizer)]
        adders = [m for m in net.modules() if isinstance(m, PACTIntegerAdd)]
        out.append(PACTController(mods, schedules["activation"], adders=adders, name="activation",
                                  **dict(kwargs_activation or {})))
    return out
