"""The run config as pydantic models: every section, key, type, range and default, stated once, torch-free.

:func:`validate` checks a config dict (as JSON gives it; the dict stays the stored form) and returns the typed
:class:`RunConfig`; the first problem becomes a :class:`ConfigError` naming the key path
(``training.gd.opt.kwargs.lr``), what is wrong and the fix; an unknown key gets the nearest valid one.
Per-layer quantizer settings are :mod:`labkit.config.spec` models. Whether a layer regex names a module of the
network is checked when the network is built (:func:`labkit.train.build.build_network`), before anything is
written.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from labkit.config.errors import ConfigError
from labkit.config.spec import SPECS, QuantSpec, describe_error

__all__ = ["ConfigError", "RunConfig", "validate", "check_quantize", "COMMANDS", "RECIPE_KWARGS"]

COMMANDS = ("start", "freeze", "thaw", "stop", "verbose_on", "verbose_off")
#: commands of the batch-norm schedule (``schedules.batchnorm``; quantizer commands do not apply)
BN_COMMANDS = ("freeze", "thaw", "verbose_on", "verbose_off")
#: ``network.quantize`` class keys and the quantizer role of what they build
QUANTIZE_CLASSES = {"PACTConv2d": "weights", "PACTLinear": "weights", "PACTUnsignedAct": "unsigned_act"}
#: keyword arguments of the reference's ``pact_recipe`` (beside ``config``), as in its MobileNet recipes
RECIPE_KWARGS = ("quantize_pool", "precision_spec_file", "finetuning_ckpt")
Probability = Annotated[float, Field(ge=0, lt=1)]
Positive = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=1)]


def tagged(pick, **members: Any) -> Any:
    """A union whose member ``pick(value)`` names (errors then come from that member alone)."""
    union = Union[tuple(Annotated[m, Tag(k)] for k, m in members.items())]  # noqa: UP007 (a runtime tuple)
    return Annotated[union, Discriminator(pick)]


def problem(message: str, path: str = "", fix: str = "") -> PydanticCustomError:
    """A validator's error: ``path`` (relative to where the validator runs) and ``fix`` land in the
    message."""
    return PydanticCustomError("labkit", message, {"path": path, "fix": fix})


class Section(BaseModel):
    """A config object: known keys only (the nearest one suggested), strict JSON types, finite numbers."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = [f.alias or name for name, f in cls.model_fields.items()]
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise problem(f"unknown key{hint}", str(key), f"Known here: {', '.join(known)}")
        return data


# ----------------------------------------------------------------------------------------------- data
class TransformKwargs(Section):
    augment: bool = False


class Transform(Section):
    class_: str = Field("TransformA", alias="class")
    kwargs: TransformKwargs = Field(default_factory=TransformKwargs)


class DatasetOptions(Section):
    transform: Transform = Field(default_factory=Transform)
    limit: Count | None = None


class Dataloader(Section):
    bs: Count | None = None
    num_workers: int = Field(0, ge=0)


class Split(Section):
    dataset: DatasetOptions = Field(default_factory=DatasetOptions)
    dataloader: Dataloader = Field(default_factory=Dataloader)


class Data(Section):
    name: Literal["embedded", "imagenet"] = "imagenet"
    root: str | None = None
    image_size: int = Field(224, ge=16, le=4096)
    train: Split = Field(default_factory=Split)
    valid: Split = Field(default_factory=Split)
    DEFAULT_BS: ClassVar[int] = 64
    #: the embedded default: scikit-learn's 1,797 digits at 32 px, 360 of them the validation split
    EMBEDDED_SIZE: ClassVar[int] = 32
    EMBEDDED_IMAGES: ClassVar[dict[str, int]] = {"train": 1437, "valid": 360}

    @model_validator(mode="after")
    def _batch_fits(self) -> Data:
        if self.name == "embedded":
            images = min(self.train.dataset.limit or self.EMBEDDED_IMAGES["train"],
                         self.EMBEDDED_IMAGES["train"])
            if self.train_bs > images:
                raise problem(f"{self.train_bs} is more than the {images} training images: no batch could be "
                              "drawn",
                              "train.dataloader.bs", "Lower it (or raise data.train.dataset.limit)")
        return self

    @property
    def train_bs(self) -> int:
        return self.train.dataloader.bs or self.DEFAULT_BS

    @property
    def valid_bs(self) -> int:
        """The validation batch, by default the training one."""
        return self.valid.dataloader.bs or self.train_bs

    @property
    def size(self) -> int:
        """Image side in pixels: the embedded digits are 32x32, ImageNet ``image_size``."""
        return self.EMBEDDED_SIZE if self.name == "embedded" else self.image_size


# ----------------------------------------------------------------------------------------------- network
class NetworkKwargs(Section):
    capacity: float = Field(1.0, gt=0, le=4)
    num_classes: int = Field(1000, ge=2)
    config: Literal["standard", "small"] = "standard"
    dropout: Probability = 0.2
    seed: int | None = None


class LayerSection(BaseModel):
    """One class key of ``network.quantize``: ``kwargs`` (the class defaults) and ``{regex: settings}``."""

    model_config = ConfigDict(extra="allow")
    ROLE: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _entries(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise problem(f"expected an object mapping module-name regexes to settings, got {_type(data)}")
        defaults = _settings(data.get("kwargs") or {}, cls.ROLE, "kwargs")
        for regex, layer in data.items():
            if regex != "kwargs":
                _regex(regex, f"[{regex!r}]")
                _settings({**defaults, **_settings(layer or {}, cls.ROLE, f"[{regex!r}]")}, cls.ROLE,
                          f"[{regex!r}]")
        return data


class ConvSection(LayerSection):
    ROLE: ClassVar[str] = "weights"


class ActSection(LayerSection):
    ROLE: ClassVar[str] = "unsigned_act"


class Harmonize(BaseModel):
    """``network.quantize.harmonize``: options, the inserted quantizers' settings and per-name overrides."""

    model_config = ConfigDict(extra="allow")
    OPTIONS: ClassVar[tuple[str, ...]] = ("requant_pool", "force_out_eps", "layers")

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise problem(f"expected an object of settings, true or false; got {data!r}")
        for key in ("requant_pool", "force_out_eps"):
            if key in data and not isinstance(data[key], bool):
                raise problem(f"expected true or false, got {data[key]!r}", key)
        settings = {k: v for k, v in data.items() if k not in cls.OPTIONS}
        _settings(settings, "signed_act", "", extra=cls.OPTIONS)
        layers = data.get("layers") or {}
        if not isinstance(layers, dict):
            raise problem("expected an object mapping regexes on inserted names to settings, got "
                          f"{_type(layers)}",
                          "layers")
        for regex, layer in layers.items():
            _regex(regex, f"layers[{regex!r}]")
            _settings({**settings, **(layer or {})}, "signed_act", f"layers[{regex!r}]")
        return data


class LayerConfig(Section):
    """The seed's layout of ``network.quantize``."""

    PACTConv2d: ConvSection | None = None
    PACTLinear: ConvSection | None = None
    PACTUnsignedAct: ActSection | None = None
    harmonize: tagged(lambda v: "<bool>" if isinstance(v, bool) else "<object>", **{"<bool>": bool,
                      "<object>": Harmonize}) | None = None


class RecipeKwargs(Section):
    config: LayerConfig
    quantize_pool: bool | None = None
    precision_spec_file: str | None = Field(None, min_length=1)
    finetuning_ckpt: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _pool_agrees(self) -> RecipeKwargs:
        pool, harmonize = self.quantize_pool, self.config.harmonize
        if pool is None:
            return self
        if harmonize is False and pool:
            raise problem("is true, but config.harmonize is false (no harmonization, so nothing re-quantizes "
                          "the pool)", "quantize_pool", "Drop one of them")
        stated = harmonize.model_extra.get("requant_pool", pool) if isinstance(harmonize, Harmonize) else pool
        if stated != pool:
            raise problem(f"is {str(pool).lower()} but config.harmonize.requant_pool is "
                          f"{str(stated).lower()} (both say whether the pool's output is re-quantized)",
                          "quantize_pool", "Keep one of them")
        return self


class RecipeCall(Section):
    """The reference framework's layout: ``{"function": "pact_recipe", "kwargs": {"config": ..., ...}}``."""

    function: Literal["pact_recipe"]
    kwargs: RecipeKwargs


def _call_or_kwargs(value: Any) -> str:
    return "<call>" if isinstance(value, dict) and "function" in value else "<kwargs>"


Quantize = tagged(_call_or_kwargs, **{"<call>": RecipeCall, "<kwargs>": LayerConfig})


class Network(Section):
    class_: Literal["MobileNetV2"] = Field(alias="class")
    kwargs: NetworkKwargs
    pretrained: str | None = None
    quantize: Quantize | None = None


# ----------------------------------------------------------------------------------------------- training
class LossKwargs(Section):
    label_smoothing: Probability = 0.0


class Loss(Section):
    class_: Literal["CrossEntropyLoss"] = Field("CrossEntropyLoss", alias="class")
    kwargs: LossKwargs = Field(default_factory=LossKwargs)


class SGDKwargs(Section):
    lr: Positive
    momentum: Probability = 0.0
    dampening: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    nesterov: bool = False


class AdamKwargs(Section):
    lr: Positive
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    eps: Positive = 1e-8
    weight_decay: float = Field(0.0, ge=0)


class PACTSGDKwargs(SGDKwargs):
    pact_decay: float = Field(0.0, ge=0)


class PACTAdamKwargs(AdamKwargs):
    pact_decay: float = Field(0.0, ge=0)


OPTIMIZER_KWARGS = {"SGD": SGDKwargs, "Adam": AdamKwargs, "AdamW": AdamKwargs, "PACTSGD": PACTSGDKwargs,
                    "PACTAdam": PACTAdamKwargs}


class EpochSchedule(BaseModel):
    """HandScheduler's ``{"epoch": factor}``."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise problem(f"expected an object {{epoch: factor}}, got {_type(data)}")
        for key, factor in data.items():
            _epoch_key(key)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 0 \
                    or factor == float("inf"):
                raise problem(f"must be a finite number >= 0, got {factor!r}", str(key))
        return data


class HandKwargs(Section):
    schedule: EpochSchedule


class StepKwargs(Section):
    step_size: Count
    gamma: Positive = 0.1


class MultiStepKwargs(Section):
    milestones: list[Annotated[int, Field(ge=0)]]
    gamma: Positive = 0.1

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, ms: list[int]) -> list[int]:
        if ms != sorted(ms):
            raise ValueError(f"expected increasing epochs, got {ms!r}")
        return ms


class CosineKwargs(Section):
    T_max: Count | None = None
    eta_min: float = Field(0.0, ge=0)


class OneCycleKwargs(Section):
    max_lr: Positive
    pct_start: float = Field(0.3, gt=0, lt=1)
    anneal_strategy: Literal["cos", "linear"] = "cos"
    div_factor: Positive = 25.0
    final_div_factor: Positive = 1e4
    three_phase: bool = False
    cycle_momentum: bool = True
    base_momentum: float = Field(0.85, ge=0, le=1)
    max_momentum: float = Field(0.95, ge=0, le=1)


SCHEDULER_KWARGS = {"HandScheduler": HandKwargs, "StepLR": StepKwargs, "MultiStepLR": MultiStepKwargs,
                    "CosineAnnealingLR": CosineKwargs, "OneCycleLR": OneCycleKwargs}


def by_class(kind: str, kwargs_models: dict[str, type[Section]], **fields: Any) -> Any:
    """``{"class": NAME, "kwargs": {...}}`` with the kwargs model of NAME (the union is tagged by "class")."""
    members = {}
    for name, kwargs in kwargs_models.items():
        required = any(f.is_required() for f in kwargs.model_fields.values())
        members[name] = create_model(f"{name}{kind}", __base__=Section, **fields,
                                     class_=(Literal[name], Field(alias="class")),
                                     kwargs=(kwargs, ... if required else Field(default_factory=kwargs)))
    return tagged(lambda v: v.get("class") if isinstance(v, dict) else None, **members)


Optimizer = by_class("Optimizer", OPTIMIZER_KWARGS, takes_net=(bool, False))
Scheduler = by_class("Scheduler", SCHEDULER_KWARGS)


class GD(Section):
    opt: Optimizer
    lr_sched: Scheduler | None = None


class StartKwargs(Section):
    init_clip_hi: float | None = None
    init_clip_lo: float | None = None


class Schedules(Section):
    linear: dict[str, Any] = Field(default_factory=dict)
    activation: dict[str, Any] = Field(default_factory=dict)
    batchnorm: dict[str, Any] = Field(default_factory=dict)

    @field_validator("linear", "activation", "batchnorm")
    @classmethod
    def _commands(cls, schedule: dict[str, Any], info) -> dict[str, Any]:
        allowed = BN_COMMANDS if info.field_name == "batchnorm" else COMMANDS
        for epoch, cmds in schedule.items():
            _epoch_key(epoch)
            listed = [cmds] if isinstance(cmds, str) else cmds
            if not isinstance(listed, list) or not all(isinstance(c, str) for c in listed):
                raise problem(f"expected a command or a list of commands, got {cmds!r}", epoch,
                              f"Commands: {', '.join(allowed)}")
            for c in listed:
                if c not in allowed:
                    close = difflib.get_close_matches(c, allowed, n=1, cutoff=0.6)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise problem(f"unknown command {c!r}{hint}", epoch, f"Commands: {', '.join(allowed)}")
        return schedule


class BatchNormKwargs(Section):
    recalibration_batches: int = Field(16, ge=0)


class Controllers(Section):
    schedules: Schedules
    kwargs_linear: StartKwargs = Field(default_factory=StartKwargs)
    kwargs_activation: StartKwargs = Field(default_factory=StartKwargs)
    kwargs_batchnorm: BatchNormKwargs = Field(default_factory=BatchNormKwargs)


class ControllersCall(Section):
    function: Literal["get_pact_controllers"]
    kwargs: Controllers


ControllerConfig = tagged(_call_or_kwargs, **{"<call>": ControllersCall, "<kwargs>": Controllers})


class EMA(Section):
    """``training.ema``: validate, checkpoint and deploy a moving average of the weights from ``start_epoch``
    on (:mod:`labkit.train.ema`; a run that ends before ``start_epoch`` keeps its trained weights)."""

    decay: float = Field(gt=0, lt=1)
    start_epoch: int = Field(0, ge=0)


class Training(Section):
    n_epochs: Count
    seed: int = Field(0, ge=0, lt=2 ** 63)
    loss_fn: Loss = Field(default_factory=Loss)
    gd: GD
    quantize: ControllerConfig | None = None
    amp: bool = True
    channels_last: bool = True
    sync_bn: bool = True
    ema: EMA | None = None

    @property
    def controllers(self) -> Controllers | None:
        """``training.quantize`` in either layout (the reference's call, or its kwargs alone)."""
        return self.quantize.kwargs if isinstance(self.quantize, ControllersCall) else self.quantize


class RunConfig(Section):
    """A whole run: ``data``, ``network``, ``training`` (plus ``name``, ``description``, ``meters``)."""

    description: str | None = None
    name: str | None = None
    meters: Any = None
    data: Data
    network: Network
    training: Training

    @model_validator(mode="after")
    def _sections_agree(self) -> RunConfig:
        if self.data.name == "imagenet" and not self.data.root:
            raise problem("is missing: the ImageNet dataset needs its folder (train/ and val/)", "data.root",
                          "Set it in the config or pass --data-root DIR")
        if self.network.quantize and not self.training.quantize:
            raise problem("is missing: network.quantize replaces layers, but no schedule starts their "
                          "quantizers, so the run would train in float", "training.quantize",
                          'Add e.g. {"schedules": {"linear": {"0": "start"}, "activation": {"1": "start"}}}')
        return self


# ----------------------------------------------------------------------------------------------- checks
def validate(cfg: Any) -> RunConfig:
    """The typed config of ``cfg`` (a config dict after overrides), else :class:`ConfigError` at its first
    problem."""
    if not isinstance(cfg, dict):
        raise ConfigError("", "a config must be a JSON object")
    return _checked(RunConfig, cfg, ())


def check_quantize(quantize: Any, where: str = "network.quantize") -> None:
    """The per-layer section alone, in either layout (every class key, regex, setting, harmonize option and
    recipe argument; whether regexes name modules and files exist is checked when the network is built)."""
    if not isinstance(quantize, dict):
        raise ConfigError(where, f"expected an object, got {_type(quantize)}")
    model = RecipeCall if "function" in quantize else LayerConfig
    _checked(model, quantize, tuple(where.split(".")))


def _checked(model: type[BaseModel], data: Any, prefix: tuple) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise config_error(err.errors()[0], prefix) from None


def config_error(error: dict, prefix: tuple = ()) -> ConfigError:
    """A pydantic error as a :class:`ConfigError` at its key path (union tags dropped, regex keys
    bracketed)."""
    ctx = error.get("ctx") or {}
    parts = [str(p) for p in (*prefix, *error["loc"]) if not str(p).startswith("<") and p != "[key]"
             and str(p) not in OPTIMIZER_KWARGS and str(p) not in SCHEDULER_KWARGS]
    path = ".".join(parts)
    if ctx.get("path"):
        sub = ctx["path"]
        path = f"{path}{sub}" if sub.startswith("[") else f"{path}.{sub}" if path else sub
    value, kind = error.get("input"), error["type"]
    if kind == "labkit":
        return ConfigError(path, error["msg"], ctx.get("fix", ""))
    if kind == "missing":
        return ConfigError(path, "is missing")
    if kind == "union_tag_invalid":
        tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        close = difflib.get_close_matches(str(ctx.get("tag")), tags, n=1, cutoff=0.6)
        return ConfigError(f"{path}.class", f"unknown value {ctx.get('tag')!r}"
                           + (f" (did you mean {close[0]!r}?)" if close else ""),
                           f"Choose one of: {', '.join(tags)}")
    if kind == "union_tag_not_found":
        return ConfigError(f"{path}.class", "is missing")
    if kind == "literal_error":
        allowed = [a.strip("'") for a in ctx.get("expected", "").replace(" or ", ", ").split(", ")]
        close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
        return ConfigError(path,
                           f"unknown value {value!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                           f"Choose one of: {', '.join(allowed)}")
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return ConfigError(path, f"expected an object, got {_type(value)}")
    if kind.endswith("_type") or kind == "finite_number":
        expected = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
                    "string_type": "a string", "list_type": "a list", "tuple_type": "a list"}.get(kind)
        if kind == "finite_number" or (isinstance(value, float) and kind == "int_type" and value != value):
            return ConfigError(path, f"must be a finite number, got {value}")
        if expected:
            shown = f"a boolean ({str(value).lower()})" if isinstance(value,
                                                                      bool) else f"{_type(value)} ({value!r})"
            return ConfigError(path, f"expected {expected}, got {shown}")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        return ConfigError(path, f"must be {bounds[kind]} {next(iter(ctx.values())):g}, got {value}")
    return ConfigError(path, describe_error({**error, "loc": ()}).removeprefix(": "))


# ----------------------------------------------------------------------------------------------- helpers
def _settings(settings: Any, role: str, path: str, extra: tuple = ()) -> dict:
    """One layer's quantizer settings, checked by the role's :class:`QuantSpec` model; returns them."""
    if not isinstance(settings, dict):
        raise problem(f"expected an object of quantizer settings, got {_type(settings)} ({settings!r})", path)
    allowed = SPECS[role].setting_names()
    for key in settings:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed | set(extra)), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise problem(f"unknown quantizer setting{hint}", f"{path}.{key}" if path else key,
                          f"Settings of {role}: {', '.join(sorted(allowed))}")
    try:
        QuantSpec.for_role(role, **settings)
    except (ValueError, TypeError) as err:
        raise problem(str(err), path) from None
    return settings


def _regex(regex: str, path: str) -> None:
    try:
        re.compile(regex)
    except re.error as err:
        raise problem(f"not a valid regular expression ({err})", path,
                      "Escape dots as '\\\\.' or anchor with '$'") from None


def _epoch_key(key: Any) -> None:
    if not str(key).isdigit():
        raise problem('epoch keys are non-negative integers in quotes, e.g. "3"', str(key))


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


