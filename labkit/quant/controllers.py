"""Epoch-schedule controllers for quantizers (facts §2).

A schedule maps epochs (str or int) to a command or a list of commands, e.g.
``{"0": ["start", "verbose_on"], "4": "freeze"}``. ``step_pre_training_epoch(e)`` applies, in epoch order,
every scheduled command with ``last_epoch < epoch <= e`` (so skipped epochs are caught up) and records
``last_epoch``; within one epoch ``verbose_on``/``verbose_off`` go first. While verbose, each command is
reported as one line to ``log`` (per-layer bounds too when ``detail`` is set) and kept, with every quantizer's
bounds, in ``events`` (the trainer writes them to the run folder). Commands are idempotent (``start`` on a
started quantizer keeps its bounds), so re-applying a schedule to a net restored from a checkpoint reproduces
the uninterrupted run's module state. The activation controller also covers the adders' quantizers and calls
every adder's ``sync_eps`` after its commands, before every training batch and before validation. At the same
points the linear controller re-derives the weight bounds that are not learned from the current weights
(``refresh_bounds``: started, not frozen, ``learn_clip`` false), so that they follow the weights as in the
reference.
"""

from __future__ import annotations

from torch import nn

from labkit.config.schema import COMMANDS
from labkit.quant.acts import PACTIntegerAdd, _ActQuantizer
from labkit.quant.base import QuantizerBase
from labkit.quant.layers import _WeightQuantizer, refresh_weight_bounds

START_KWARGS = ("init_clip_hi", "init_clip_lo")


def sync_quantizers(net: nn.Module) -> None:
    """What the controllers ensure before every forward pass, for a whole network: every adder's inputs share
    one eps, and weight bounds that follow the weights are re-derived from them."""
    for m in net.modules():
        if isinstance(m, PACTIntegerAdd):
            m.sync_eps()
    refresh_weight_bounds([m for m in net.modules() if isinstance(m, _WeightQuantizer)])


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
    """Drives a set of quantizers (``[(name, module)]``) by an epoch schedule; ``start_kwargs`` go to
    ``start``."""

    def __init__(self, modules: list[tuple[str, QuantizerBase]], schedule: dict | None, adders=(),
                 name: str = "quantizers", **start_kwargs):
        for k in start_kwargs:
            if k not in START_KWARGS:
                raise TypeError(f"{name} controller: unknown keyword {k!r}; allowed: "
                                f"{', '.join(START_KWARGS)}")
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
        self.log(f"[{self.name} controller] {command}: {len(rows)} quantizers, eps {min(eps):.3g} .. "
                 f"{max(eps):.3g}")
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


class BatchNormController:
    """Drives the batch-norm layers of ``net`` by an epoch schedule (``schedules.batchnorm``). ``freeze``
    re-estimates every layer's running mean and variance as the plain average over the next
    ``recalibration_batches`` training batches (the network as it then is, quantizers included; 0: keep the
    running statistics as they are), then normalises with those fixed statistics in training too, so that
    training optimises the network that evaluation runs (standard QAT practice: batch statistics frozen for
    the last epochs); ``thaw`` returns to batch statistics and running averages. The affine parameters keep
    training. It acts through the trainer's hooks: before every training batch (after the loop's
    ``model.train()``) it puts the layers in the mode the state asks for; layers are looked up then, so a
    SyncBatchNorm conversion after construction is followed. Each command is one line in ``log``."""

    COMMANDS = ("freeze", "thaw", "verbose_on", "verbose_off")

    def __init__(self, net: nn.Module, schedule: dict | None, recalibration_batches: int = 16,
                 name: str = "batchnorm"):
        if isinstance(recalibration_batches, bool) or not isinstance(recalibration_batches, int) \
                or recalibration_batches < 0:
            raise ValueError(f"{name} controller: recalibration_batches {recalibration_batches!r} is not a "
                             "number of batches (>= 0)")
        self.net, self.name = net, name
        self.schedule = parse_schedule(schedule, f"{name} schedule")
        for epoch, cmds in self.schedule.items():
            wrong = [c for c in cmds if c not in self.COMMANDS]
            if wrong:
                raise ValueError(f"{name} schedule[{str(epoch)!r}]: command {wrong[0]!r} does not apply to "
                                 f"batch norm; use {', '.join(self.COMMANDS)}")
        self.recalibration_batches = recalibration_batches
        self.momenta = {n: m.momentum for n, m in self.layers()}
        self.frozen = False
        self.to_average = 0  # training batches still to average into the running statistics before freezing
        self.last_epoch = -1
        self.log = print
        self.detail = False
        self.events: list[dict] = []  # nothing for quantizers.jsonl: batch norm has no bounds

    def layers(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def apply(self, command: str) -> None:
        if command not in self.COMMANDS:
            raise ValueError(f"unknown batch-norm command {command!r}; allowed: {', '.join(self.COMMANDS)}")
        if command.startswith("verbose"):
            return  # batch-norm commands are always reported
        self.frozen = command == "freeze"
        self.to_average = self.recalibration_batches if self.frozen else 0
        for _, m in self.layers() if self.to_average else ():
            m.reset_running_stats()
        how = (
            f" after averaging the statistics of {self.to_average} training batches"
            if self.to_average
            else ""
        )
        self.log(f"[{self.name} controller] {command}: {len(self.momenta)} layers{how}")

    def step_pre_training_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        for e, cmds in self.schedule.items():
            if self.last_epoch < e <= epoch:
                for c in cmds:
                    self.apply(c)
        self.last_epoch = max(self.last_epoch, epoch)

    def step_pre_training_batch(self) -> None:
        """Frozen: running statistics (eval mode), after ``to_average`` batches of plain averaging."""
        averaging = self.frozen and self.to_average > 0
        for n, m in self.layers():
            m.momentum = None if averaging else self.momenta.get(n, m.momentum)  # None: the plain average
            if self.frozen and not averaging:
                m.eval()
        self.to_average -= averaging

    def step_pre_validation_epoch(self, epoch: int | None = None) -> None:
        for n, m in self.layers():
            m.momentum = self.momenta.get(n, m.momentum)

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "frozen": self.frozen, "to_average": self.to_average,
                "schedule": {str(k): v for k, v in self.schedule.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state.get("last_epoch", -1))
        self.frozen = bool(state.get("frozen", False))
        self.to_average = int(state.get("to_average", 0))


def get_pact_controllers(net: nn.Module, schedules: dict, kwargs_linear: dict | None = None,
                         kwargs_activation: dict | None = None, kwargs_batchnorm: dict | None = None) -> list:
    """Controllers for ``schedules = {"linear": {...}, "activation": {...}, "batchnorm": {...}}`` (any key may
    be missing): ``linear`` drives PACTConv2d/PACTLinear weight quantizers; ``activation`` drives activation
    quantizers (adders' included) and syncs adder eps; ``batchnorm`` (labkit's, not the reference's) freezes
    and thaws the batch-norm statistics (:class:`BatchNormController`).
    ``kwargs_linear``/``kwargs_activation`` (``init_clip_hi``/``init_clip_lo``) go to ``start``;
    ``kwargs_batchnorm`` (``recalibration_batches``) to the batch-norm controller."""
    schedules = dict(schedules or {})
    unknown = set(schedules) - {"linear", "activation", "batchnorm"}
    if unknown:
        raise ValueError(f"schedules: unknown key(s) {sorted(unknown)}; allowed: 'linear', 'activation', "
                         "'batchnorm'")
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
    if "batchnorm" in schedules:
        out.append(BatchNormController(net, schedules["batchnorm"], **dict(kwargs_batchnorm or {})))
    return out
