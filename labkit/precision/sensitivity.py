"""Per-layer sensitivity to quantization: how much the loss grows when one layer alone is quantized at b bits.

**Method** (AIMET's per-layer analysis, run for every candidate bit-width). The fake-quantized network of a
PACT/TQT base config is built with the float weights of a trained run (an FP32 run, or a QAT run whose
conv/BN/linear tensors are taken), every quantizer off, batch norm on its running statistics. On a
calibration subset of the *training* split (``n_calib`` images spread evenly over it, no augmentation; the
validation images stay unseen) the mean cross-entropy ``L0`` is measured. Then, one at a time:

* weights of layer l at b bits: only that layer's weight quantizer starts, on 2^b levels, its bounds by the
  base config's own rule (SAWB at b bits for the low-bit configs; weight bounds are not learned, so this is
  the grid QAT trains with): ``s_w(l, b) = L - L0``;
* activation group g at b bits (:meth:`labkit.precision.bitplan.BitPlan.activation_groups`: an activation, an
  inserted requantizer, or an integer adder with its input and output quantizers, plus the quantizers that
  follow it): only g's quantizers start, each with the clip that minimises the mean squared quantization
  error of its calibration inputs over :data:`CLIP_GRID` candidates ``k/CLIP_GRID`` of their range (QAT
  learns a clip; the MSE-optimal one stands in for it), an adder's inputs sharing one eps as in training:
  ``s_a(g, b) = L - L0``.

**Assumptions.** (1) Additivity: a plan's loss is ``L0`` plus the sum of its layers' ``s`` (the quantization
noises of different layers act independently, the first-order model of HAWQ and AIMET); the allocation
(:mod:`labkit.precision.allocate`) minimises that sum. (2) Post-training sensitivity ranks layers the way they
rank after QAT, which recovers part of each loss. Values can be slightly negative (noise that happens to
help).

**Second method, ``fisher``** (HAWQ-V2's ``trace(H) ||Q(W) - W||^2`` with the diagonal empirical Fisher
``F = E_x[g(x)^2]`` in place of the Hessian; no re-run per layer): with ``g`` the gradient of one image's
cross-entropy and ``d(b) = Q_b(v) - v`` the quantization error of a weight or activation value at b bits
(the same grids and clips as above),

    s_w(l, b) = 1/2 sum_i F_i d_i(b)^2,        s_a(g, b) = 1/2 E_x[ sum_j g_j(x)^2 d_j(x, b)^2 ]

(sums over the layer's weights / the group's quantized values), the second-order loss increase when the
quantization noise is independent of the gradient. One forward and backward pass per image.

Results are cached in ``sensitivity.json`` beside the checkpoint, keyed by method, the version of the
quantizer rules, bits, calibration size, the sha256 of the checkpoint file and of the network/quantize/data
settings, so a stale entry is never used.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from tqdm.auto import tqdm

from labkit.config.budget import SENSITIVITY_METHOD, SENSITIVITY_METHODS, bit_choices
from labkit.config.paths import resolve
from labkit.config.schema import ConfigError
from labkit.config.tables import Table
from labkit.models.torchvision import is_torchvision_state_dict, torchvision_key
from labkit.precision.bitplan import BitPlan
from labkit.quant import SAWB_COEFFS, PACTIntegerAdd, QuantizerBase
from labkit.quant.recipe import pact_recipe
from labkit.train.build import build_float_network
from labkit.train.checkpoint import CheckpointError, read_state_dict, write_text_atomic
from labkit.train.data import build_datasets
from labkit.train.runs import RunFolder

#: the sensitivity measures: ``loss`` (one layer quantized at a time, re-run) and ``fisher`` (second order)
METHODS = dict(zip(SENSITIVITY_METHODS, ("calibration-loss increase, one layer quantized at a time",
                                         "second-order loss increase, diagonal empirical Fisher x squared "
                                         "quantization error")))
#: bumped whenever a quantizer's bound rule changes results (2: SAWB above 16 levels checked against max |w|),
#: so that entries measured under the old rule are not used
RULES = 2
CACHE = "sensitivity.json"
DEFAULT_BITS = (2, 3, 4, 8)
CLIP_GRID = 32  # candidate activation clips k/CLIP_GRID of the observed range
SAMPLES = 1 << 13  # calibration values kept per activation quantizer for the clip search
RECORD_BYTES = 1 << 28  # recorded node outputs per batch at most (the batch shrinks to fit)


@dataclass
class Sensitivity:
    """``weights[layer][b]`` and ``activations[group][b]``: calibration-loss increase (nats per image) with
    only that layer / group quantized at ``b`` bits; ``base_loss``: the float network's loss ``L0``."""

    bits: tuple[int, ...]
    n_calib: int
    base_loss: float
    weights: dict[str, dict[int, float]]
    activations: dict[str, dict[int, float]]
    checkpoint: str
    key: str
    method: str = SENSITIVITY_METHOD
    cached: bool = field(default=False, compare=False)

    def as_json(self) -> dict:
        out = asdict(self)
        out.pop("cached")
        for part in ("weights", "activations"):
            out[part] = {n: {str(b): v for b, v in by_bits.items()} for n, by_bits in out[part].items()}
        out["bits"] = list(self.bits)
        return out

    @classmethod
    def from_json(cls, data: dict, cached: bool = False) -> Sensitivity:
        parts = {p: {n: {int(b): float(v) for b, v in by_bits.items()} for n, by_bits in data[p].items()}
                 for p in ("weights", "activations")}
        return cls(tuple(data["bits"]), int(data["n_calib"]), float(data["base_loss"]), parts["weights"],
                   parts["activations"], data["checkpoint"], data["key"],
                   data.get("method", SENSITIVITY_METHOD), cached)

    def table(self) -> Table:
        """One row per weight layer and activation group: the loss increase at each bit-width."""
        rows = [{"quantizer": part, "name": name, **{f"{b} bit": v for b, v in by_bits.items()}}
                for part in ("weights", "activations") for name, by_bits in getattr(self, part).items()]
        return Table(rows, ["quantizer", "name"] + [f"{b} bit" for b in self.bits], title=self.summary())

    def summary(self) -> str:
        worst = max(((v[min(self.bits)], n) for part in (self.weights, self.activations) for n,
                     v in part.items()),
                    default=(0.0, "-"))
        return (f"sensitivity ({self.method}: {METHODS.get(self.method, self.method)}) of "
                f"{self.checkpoint} on {self.n_calib} training images, L0 = {self.base_loss:.4f}; "
                f"{len(self.weights)} weight layers, {len(self.activations)} activation groups at "
                f"{', '.join(map(str, self.bits))} bits; most sensitive at {min(self.bits)} bits: {worst[1]} "
                f"(+{worst[0]:.3f}){' [cached]' if self.cached else ''}")

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


# ------------------------------------------------------------------------------------------- entry point
def measure_sensitivity(cfg: dict, checkpoint: str | Path | None = None, bits=DEFAULT_BITS,
                        n_calib: int = 256,
                        batch_size: int = 128, cache: bool = True, progress: bool = False,
                        method: str = SENSITIVITY_METHOD) -> Sensitivity:
    """Sensitivity (module docstring) of the network of PACT/TQT config ``cfg`` with the float weights of
    ``checkpoint`` (a run folder or checkpoint file; default ``network.pretrained``) by ``method`` (one of
    :data:`METHODS`), read from or written to ``sensitivity.json`` beside it when ``cache``."""
    if method not in METHODS:
        raise ValueError(f"sensitivity method {method!r}: use one of {', '.join(METHODS)}")
    if not cfg["network"].get("quantize"):
        raise ConfigError("network.quantize", "is missing: sensitivity needs the PACT/TQT config whose bits "
                          "it varies", "Pass e.g. configs/embedded/config.pact.4b.json")
    path = checkpoint_file(checkpoint if checkpoint is not None else cfg["network"].get("pretrained"))
    bits = bit_choices(bits)
    if not isinstance(n_calib, int) or isinstance(n_calib, bool) or n_calib < 1:
        raise ValueError(f"n_calib: {n_calib!r} is not a number of calibration images (>= 1)")
    key = cache_key(cfg, path, bits, n_calib, method)
    store = path.parent / CACHE
    if cache:
        entry = read_cache(store).get(key)
        if entry is not None:
            return Sensitivity.from_json(entry, cached=True)
    qnet = float_weights_network(cfg, path)
    x, y = calibration_batch(cfg["data"], n_calib)
    plan = BitPlan(qnet, (1, *x.shape[1:]))
    _check_sawb(qnet, plan, bits)
    run = measure_fisher if method == "fisher" else measure
    base, weights, acts = run(qnet, plan, x, y, bits, batch_size, progress)
    result = Sensitivity(bits, len(x), base, weights, acts, str(path), key, method)
    if cache:
        try:
            write_text_atomic(json.dumps({**read_cache(store), key: result.as_json()}, indent=1) + "\n",
                              store)
        except OSError as err:
            warnings.warn(f"sensitivity not cached: cannot write {store} ({err.strerror})", stacklevel=2)
    return result


def checkpoint_file(path) -> Path:
    """A run folder's ``best.ckpt`` or a checkpoint file, which must exist."""
    if not path:
        raise CheckpointError("no checkpoint to measure: pass the trained run (folder or .ckpt), or set "
                              "network.pretrained in the config")
    found = resolve(path)
    if found.is_dir():
        found = RunFolder(found).checkpoint("best")
    if not found.is_file():
        raise CheckpointError(f"checkpoint '{found}' not found: train the FP32 run first (labkit train "
                              "configs/embedded/config.fp32.json) or pass an existing run")
    return found


def _check_sawb(qnet: nn.Module, plan: BitPlan, bits: tuple[int, ...]) -> None:
    sawb = [n for n in plan.w_bits if qnet.get_submodule(n).init_clip.startswith("sawb")]
    lacking = [b for b in bits if 2 ** b not in SAWB_COEFFS]
    if sawb and lacking:
        raise ValueError(f"bits {lacking}: weights of '{sawb[0]}' (and {len(sawb) - 1} more) start by SAWB, "
                         f"whose coefficients exist for {sorted(SAWB_COEFFS)} levels only; use bits up to 8")


def cache_key(cfg: dict, checkpoint: Path, bits: tuple[int, ...], n_calib: int,
              method: str = SENSITIVITY_METHOD) -> str:
    """Method, bits, calibration size, sha256 of the checkpoint and of the settings the result depends on."""
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]
    network = {k: v for k, v in cfg["network"].items() if k != "pretrained"}
    data = {k: cfg["data"].get(k) for k in ("name", "root", "image_size")}
    data["train_limit"] = cfg["data"].get("train", {}).get("dataset", {}).get("limit")
    settings = hashlib.sha256(json.dumps([network, data], sort_keys=True).encode()).hexdigest()[:16]
    return f"{method}|rules={RULES}|bits={','.join(map(str, bits))}|n={n_calib}|ckpt={digest}|net={settings}"


def read_cache(path: Path) -> dict:
    """The cached entries of ``sensitivity.json`` (``{}`` when missing or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------- building
def float_weights_network(cfg: dict, checkpoint: Path) -> fx.GraphModule:
    """``cfg``'s fake-quantized network (every quantizer off) with the float tensors of ``checkpoint``."""
    net = build_float_network(cfg)
    state, _ = read_state_dict(checkpoint)
    if is_torchvision_state_dict(state):
        state = {torchvision_key(k): v for k, v in state.items()}
    own = net.state_dict()
    missing = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if missing:
        raise CheckpointError(f"'{checkpoint}' does not fit the network of the config: '{missing[0]}' is "
                              f"missing or has another shape ({len(missing)} tensors): pass a run of the "
                              "same network (network.kwargs width, classes, stride table)")
    net.load_state_dict({k: state[k] for k in own})
    qnet, _ = pact_recipe(net, cfg["network"]["quantize"])
    if not isinstance(qnet, fx.GraphModule):
        raise ConfigError("network.quantize.harmonize", "is false: sensitivity needs the harmonized network")
    # layers left in float (e.g. a ReLU6 no quantizer replaced) must not work in place
    for module in qnet.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return qnet.eval()


def calibration_batch(data_cfg: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training images spread evenly over the training split (no augmentation) and their labels."""
    data_cfg = copy.deepcopy(data_cfg)
    train_cfg = data_cfg.setdefault("train", {}).setdefault("dataset", {})
    train_cfg.setdefault("transform", {}).setdefault("kwargs", {})["augment"] = False
    train, _ = build_datasets(data_cfg)
    index = np.linspace(0, len(train) - 1, min(n, len(train))).round().astype(int)
    images, labels = zip(*(train[int(i)] for i in index))
    return torch.stack(images), torch.as_tensor(labels)


# ------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def measure(qnet: fx.GraphModule, plan: BitPlan, x: torch.Tensor, y: torch.Tensor, bits=DEFAULT_BITS,
            batch_size: int = 128, progress: bool = False) -> tuple[float, dict, dict]:
    """``(L0, weights, activations)`` of the module docstring for the harmonized fake-quant network ``qnet``
    (every quantizer off, eval mode; ``plan``: its :class:`BitPlan`) on images ``x`` with labels ``y``.

    Per batch (of at most ``batch_size`` images, fewer when its recorded values would exceed
    :data:`RECORD_BYTES`) the float run is recorded once; each layer/group then re-runs only the graph nodes
    downstream of what it quantized (the others keep their recorded values), once for all bit-widths: the
    quantized modules run each bit-width's copy of their input with that bit-width's settings, and the float
    nodes below them one batch of ``len(bits)`` copies (the same numbers as one full forward pass per
    bit-width, up to float rounding; so no module may work in place)."""
    modules, jobs, clips = _jobs(qnet, plan, x, bits, batch_size)
    sums = {(job.part, job.name, b): 0.0 for job in jobs for b in bits}
    base = 0.0
    record, rerun = _Record(qnet), _Rerun(qnet, bits)
    per_image = sum(v.numel() * v.element_size() for v in record.record(x[:1]).values() if torch.is_tensor(v))
    batch_size = max(1, min(batch_size, RECORD_BYTES // per_image))
    bar = tqdm(total=len(jobs) * -(-len(x) // batch_size), desc="sensitivity", disable=not progress,
               mininterval=1.0)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        rerun.recorded = record.record(xb)
        base += _ce_sum(rerun.recorded["output"], yb)
        for job in jobs:
            logits = rerun.run_job(xb, job, lambda b, job=job: job.configure(modules, clips, b))
            for b, chunk in zip(bits, logits.chunk(len(bits))):
                sums[job.part, job.name, b] += _ce_sum(chunk, yb)
            for q in job.quantizers:
                modules[q].stop()
            bar.update()
    bar.close()
    out: dict[str, dict] = {"weights": {}, "activations": {}}
    for (part, name, b), total in sums.items():
        out[part].setdefault(name, {})[b] = (total - base) / len(x)
    return base / len(x), out["weights"], out["activations"]


def measure_fisher(qnet: fx.GraphModule, plan: BitPlan, x: torch.Tensor, y: torch.Tensor, bits=DEFAULT_BITS,
                   batch_size: int = 128, progress: bool = False) -> tuple[float, dict, dict]:
    """``(L0, weights, activations)`` by the ``fisher`` method of the module docstring, same arguments as
    :func:`measure`: ``F`` of the weights from one backward pass per image; activation gradients per image
    from one backward pass per batch (eval mode: the images of a batch do not interact)."""
    with torch.no_grad():
        modules, jobs, clips = _jobs(qnet, plan, x, bits, batch_size)
    weights = {job.name: modules[job.name].weight for job in jobs if job.part == "weights"}
    fisher = {n: torch.zeros_like(w) for n, w in weights.items()}
    acts = [job for job in jobs if job.part == "activations"]
    sums = {(job.name, b): 0.0 for job in acts for b in bits}
    base = 0.0
    for i in tqdm(range(len(x)), desc="sensitivity (fisher)", disable=not progress, mininterval=1.0):
        loss = nn.functional.cross_entropy(qnet(x[i:i + 1]), y[i:i + 1])
        for n, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
            fisher[n] += g.square()
    watched = [q for job in acts for q in job.quantizers]
    for i in range(0, len(x), batch_size):
        outputs = _outputs_and_gradients(qnet, watched, x[i:i + batch_size], y[i:i + batch_size])
        base += float(outputs.pop("loss"))
        with torch.no_grad():
            for job in acts:
                for b in bits:
                    job.configure(modules, clips, b)
                    sums[job.name, b] += sum(_noise_energy(modules[q].fake_quant(v) - v, g.square())
                                             for q in job.quantizers if q in outputs for v, g in [outputs[q]])
                for q in job.quantizers:
                    modules[q].stop()
    return base / len(x), _weight_fisher_terms(modules, fisher, bits, len(x)), \
        {name: {b: sums[name, b] / (2 * len(x)) for b in bits} for name in {job.name for job in acts}}


@torch.no_grad()
def _weight_fisher_terms(modules: dict, fisher: dict, bits, n: int) -> dict[str, dict[int, float]]:
    """``1/2 sum_i F_i d_i(b)^2`` per layer, with ``fisher`` the summed squared gradients of ``n`` images."""
    out: dict[str, dict[int, float]] = {}
    for name, total in fisher.items():
        layer = modules[name]
        out[name] = {}
        for b in bits:
            _restart(layer, n_levels=2 ** b)
            out[name][b] = _noise_energy(layer.fake_quant(layer.weight) - layer.weight, total) / (2 * n)
            layer.stop()
    return out


def _noise_energy(error: torch.Tensor, fisher: torch.Tensor) -> float:
    """``sum_i F_i d_i^2``."""
    return float((fisher * error.square()).sum())


def _outputs_and_gradients(net: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor) -> dict:
    """``{name: (output, d loss / d output)}`` of each named module for the summed cross-entropy of ``x``
    (each image's own gradient in eval mode), and ``loss``: that sum."""
    modules = dict(net.named_modules())
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inputs, out):
            if out.requires_grad:
                out.retain_grad()
                seen[name] = out
        return hook

    hooks = [modules[n].register_forward_hook(keep(n)) for n in dict.fromkeys(names)]
    try:
        loss = nn.functional.cross_entropy(net(x), y, reduction="sum")
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    net.zero_grad(set_to_none=True)
    return {"loss": loss.detach(), **{n: (v.detach(), v.grad) for n, v in seen.items()}}


def _jobs(qnet: fx.GraphModule, plan: BitPlan, x: torch.Tensor, bits, batch_size: int) -> tuple[dict, list,
                                                                                                   dict]:
    """``(modules, jobs, clips)``: a :class:`_Job` per weight layer and activation group, and the MSE-optimal
    clip of every activation quantizer at each bit-width on ``x``."""
    modules = dict(qnet.named_modules())
    inplace = [n for n, m in modules.items() if getattr(m, "inplace", False)]
    if inplace:
        raise ValueError(f"'{inplace[0]}' works in place, which would overwrite recorded values: set its "
                         "inplace to False (float_weights_network does)")
    members = plan.activation_groups()
    groups = {leader: [q for name in names for q in _quantizers(name, modules)] for leader,
              names in members.items()}
    samples = _activation_samples(qnet, [q for qs in groups.values() for q in qs], x, batch_size)
    clips = {(q, b): _mse_clip(modules[q], samples[q],
                               2 ** b) for qs in groups.values() for q in qs for b in bits}
    jobs = [_Job("weights", g.name, [g.name], [g.name]) for g in plan.layers] + \
        [_Job("activations", k, v, groups[k], [modules[n] for n in v
                                               if isinstance(modules[n], PACTIntegerAdd)])
         for k, v in members.items()]
    return modules, jobs, clips


@dataclass
class _Job:
    """One weight layer or activation group: the graph modules it quantizes (``targets``), its quantizers and
    the adders whose inputs share one eps."""

    part: str
    name: str
    targets: list[str]
    quantizers: list[str]
    adders: list = field(default_factory=list)

    def configure(self, modules: dict, clips: dict, bits: int) -> None:
        """Start the job's quantizers at ``bits``: weights by the layer's own rule, activations at their
        clip."""
        for q in self.quantizers:
            if self.part == "weights":
                _restart(modules[q], n_levels=2 ** bits)
            else:
                _start_at(modules[q], *clips[q, bits])
        for adder in self.adders:
            adder.sync_eps()  # the inputs share one eps, as in training


class _Record(fx.Interpreter):
    """Runs the graph and keeps every node's output (by node name; the network output as ``output``)."""

    def record(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.values: dict[str, torch.Tensor] = {}
        self.values["output"] = self.run(x)
        return self.values

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        self.values[n.name] = value
        return value


class _Rerun(fx.Interpreter):
    """Re-runs one job for every bit-width at once: nodes outside ``dirty`` give their value in ``recorded``
    (``len(bits)`` copies along the batch where a float node below the job reads them); the job's own modules
    run each bit-width's part of the batch after ``configure(bits)``; the other dirty nodes the whole
    batch."""

    def __init__(self, module: fx.GraphModule, bits):
        super().__init__(module)
        self.bits = tuple(bits)
        self.recorded: dict[str, torch.Tensor] = {}
        self.downstream: dict[str, tuple[set[str], set[str]]] = {}

    def run_job(self, x: torch.Tensor, job: _Job, configure) -> torch.Tensor:
        if job.name not in self.downstream:
            dirty = _downstream(self.graph, job.targets)
            tiled = {a.name for n in self.graph.nodes if n.name in dirty and not self._is_target(n,
                                                                                                 job.targets)
                     for a in n.all_input_nodes if a.name not in dirty}
            self.downstream[job.name] = dirty, tiled
        self.dirty, self.tiled = self.downstream[job.name]
        self.targets, self.configure, self.batch = job.targets, configure, len(x)
        return self.run(x)

    @staticmethod
    def _is_target(n: fx.Node, targets) -> bool:
        return n.op == "call_module" and n.target in targets

    def run_node(self, n: fx.Node):
        if n.op != "output" and n.name not in self.dirty:
            value = self.recorded[n.name]
            if n.name in self.tiled and torch.is_tensor(value):
                return value.repeat(len(self.bits), *[1] * (value.dim() - 1))
            return value
        if not self._is_target(n, self.targets):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        outputs = []
        for i, b in enumerate(self.bits):
            self.configure(b)
            part = tuple(a[i * self.batch:(i + 1) * self.batch] if torch.is_tensor(a) and len(a) > self.batch
                         else a for a in args)
            outputs.append(self.call_module(n.target, part, kwargs))
        return torch.cat(outputs)


def _downstream(graph: fx.Graph, targets: list[str]) -> set[str]:
    """Names of the nodes that call one of the modules ``targets`` and of every node that depends on them."""
    found = {n for n in graph.nodes if n.op == "call_module" and n.target in targets}
    todo = list(found)
    while todo:
        for user in todo.pop().users:
            if user not in found:
                found.add(user)
                todo.append(user)
    return {n.name for n in found}


def _quantizers(name: str, modules: dict[str, nn.Module]) -> list[str]:
    """The quantizer modules behind an activation key: an adder's inputs and output, else the module
    itself."""
    module = modules[name]
    if isinstance(module, PACTIntegerAdd):
        return [f"{name}.acts.{i}" for i in range(len(module.acts))] + [f"{name}.act_out"]
    return [name]


def _ce_sum(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(logits, y, reduction="sum"))


def _activation_samples(net, names: list[str], x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Each named quantizer's float output on ``x``: all values, or :data:`SAMPLES` of them (a fixed draw)."""
    modules = dict(net.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [modules[n].register_forward_hook(lambda m, i, out, n=n: seen[n].append(out.detach().reshape(-1)))
             for n in names]
    try:
        for i in range(0, len(x), batch_size):
            net(x[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for n, parts in seen.items():
        values = torch.cat(parts)
        out[n] = values if len(values) <= SAMPLES else values[torch.randint(len(values), (SAMPLES,),
                                                                            generator=gen)]
    return out


def _restart(q: QuantizerBase, **settings) -> None:
    """Re-initialise ``q`` with changed settings (by its bound rule) and start it."""
    q.spec = q.spec.replace(**settings)
    q.stop()
    q.start()


def _mse_clip(q: QuantizerBase, values: torch.Tensor, n_levels: int) -> tuple[dict, torch.Tensor]:
    """``(settings, eps)`` that start ``q`` (:func:`_start_at`) on ``n_levels`` levels with the step, among
    ``k/CLIP_GRID`` of the step that covers the range of ``values``, of least mean squared quantization error
    on them (symmetric grids cover max |value|; an asymmetric one keeps its lower bound)."""
    lo, hi = float(values.min()), float(values.max())
    if q.signed and (q.symm or q.tqt):
        hi = max(abs(lo), abs(hi))
        lo = -hi
    settings = {"n_levels": n_levels, "init_clip": "const", "init_clip_lo": min(lo, 0.0),
                "init_clip_hi": max(hi, 1e-8)}
    _restart(q, **settings)
    full = q.get_eps()
    best = (float("inf"), full)
    for k in range(1, CLIP_GRID + 1):
        q.set_eps(full * k / CLIP_GRID)
        err = float(((q.fake_quant(values) - values) ** 2).mean())
        if err < best[0]:
            best = (err, q.get_eps())
    q.stop()
    return settings, best[1]


def _start_at(q: QuantizerBase, settings: dict, eps: torch.Tensor) -> None:
    _restart(q, **settings)
    q.set_eps(eps)
