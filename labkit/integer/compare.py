"""Check an integer network against its fake-quant twin, element by element and layer by layer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn

from labkit.config.tables import Table
from labkit.integer.modules import IntegerizeError, QuantizeInput, _channel_view, requant_layers


@dataclass
class Comparison:
    """Result of :func:`compare`: per-layer code agreement and prediction agreement.

    ``layers``: one row per requantization (graph order) and one for the output logits, with ``identical``
    (share of identical codes, %), ``mismatches`` and ``max_diff`` (largest code difference) measured **layer
    by layer** (the integer layer gets the fake-quant network's input codes, so a row measures that layer's
    own arithmetic), and ``e2e_identical`` / ``e2e_max_diff`` measured **end to end** (the integer network
    runs on its own codes; an early off-by-one spreads through later layers). ``predictions``: share (%) of
    samples whose argmax agree end to end. ``top1_fake`` / ``top1_int``: accuracies (%) of the reference and
    of the integer network when labels were given; ``reference``: what the integer network was compared with.
    The last row compares the logits in units of their LSB (``eps_w * eps_in``): the fake-quant logits are
    float32 sums, so a 1-LSB difference there is float32 rounding, not a code error; it does not count as a
    code layer.
    """

    layers: list[dict]
    n: int
    predictions: float
    top1_fake: float | None = None
    top1_int: float | None = None
    reference: str = "fake-quant"

    COLUMNS = ("layer", "kind", "elements", "identical", "mismatches", "max_diff", "e2e_identical",
               "e2e_max_diff")

    @property
    def code_layers(self) -> list[dict]:
        """The rows of quantized tensors (every row but the logits)."""
        return [r for r in self.layers if r["kind"] != "logits"]

    @property
    def worst(self) -> dict:
        return min(self.code_layers, key=lambda r: (r["identical"], -r["max_diff"]))

    @property
    def min_identical(self) -> float:
        return min(r["identical"] for r in self.code_layers)

    @property
    def min_e2e_identical(self) -> float:
        return min(r["e2e_identical"] for r in self.code_layers)

    def ok(self, identical: float = 99.99) -> bool:
        """Every code layer at least ``identical`` % identical codes (layer by layer), every prediction
        identical (end to end), equal top-1."""
        return self.min_identical >= identical and self.predictions == 100.0 and \
            (self.top1_int is None or self.top1_int == self.top1_fake)

    def table(self) -> Table:
        return Table(self.layers, self.COLUMNS, title=f"integer vs {self.reference}, {self.summary()}")

    def summary(self) -> str:
        w = self.worst
        s = (f"{self.n} samples: predictions identical {self.predictions:.2f}%; worst layer '{w['layer']}' "
             f"{w['identical']:.4f}% identical codes (max difference {w['max_diff']})")
        if self.top1_int is not None:
            s += f"; top-1 integer {self.top1_int:.2f}%, fake-quant {self.top1_fake:.2f}%"
        return s

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def __str__(self) -> str:
        return str(self.table())


def _batches(batch) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(batch, torch.Tensor):
        yield batch, None
        return
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor) \
            and isinstance(batch[1], torch.Tensor) and batch[1].dim() == 1 and batch[0].dim() > 1:
        yield batch[0], batch[1]
        return
    for item in batch:
        if isinstance(item, torch.Tensor):
            yield item, None
        else:
            yield item[0], item[1]


class _Tally:
    def __init__(self):
        self.n = self.same = self.worst = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        diff = (a - b).abs()
        self.n += diff.numel()
        self.same += int((diff == 0).sum())
        self.worst = max(self.worst, int(diff.max()) if diff.numel() else 0)

    @property
    def share(self) -> float:
        return 100.0 * self.same / max(self.n, 1)


def _is_integer(net: nn.Module) -> bool:
    return isinstance(getattr(net, "input_quant", None), QuantizeInput)


@torch.no_grad()
def compare(qnet: nn.Module, inet: fx.GraphModule, batch) -> Comparison:
    """Run the reference ``qnet`` and the integer ``inet`` on the same inputs and compare them element-wise.

    ``qnet``: the fake-quant network, or another integer network with the same layer names (e.g. the exact
    int64 twin, to measure an int32 one). ``batch``: an input tensor, an ``(inputs, labels)`` pair, or an
    iterable of either (a DataLoader). Both networks see the same quantized input (a fake-quant ``qnet`` gets
    ``eps_in * codes``). For every requantization the fake-quant output is turned into codes
    (``round(y / eps)``; an integer reference gives codes) and compared with the integer codes, twice: layer
    by layer (each requantization of ``inet`` fed with the reference's input codes) and end to end (see
    :class:`Comparison`). The output row compares the logits in units of the integer output's LSB.
    Predictions (argmax) are compared end to end on every sample.
    """
    qmods = dict(qnet.named_modules())
    layers = requant_layers(inet)
    missing = [n for n, _ in layers if n not in qmods]
    if missing:
        raise IntegerizeError(f"compare: the fake-quant network has no module '{missing[0]}': was inet made "
                              "from it by integerize()?")
    integer_ref = _is_integer(qnet)
    codes = _LayerCodes(qmods, layers, integer_ref)
    out_local, out_e2e = _Tally(), _Tally()
    agree = total = correct_q = correct_i = 0
    labelled = True
    was = qnet.training
    qnet.eval()
    param = next(qnet.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float64)
    try:
        for x, y in _batches(batch):
            x = x.to(device)
            if integer_ref:
                lq = logits_q = qnet(x)
            else:
                logits_q = qnet((inet.input_quant(x).double() * inet.eps_in).to(dtype))
                scale = _channel_view(inet.output_scale.to(device).double(), logits_q)
                lq = torch.round(logits_q.double() / scale).to(torch.int64)
            codes.forcing = True
            out_local.add(lq, inet(x))
            codes.forcing = False
            logits_i = inet(x)
            out_e2e.add(lq, logits_i)
            pq, pi = logits_q.argmax(1), logits_i.argmax(1)
            agree += int((pq == pi).sum())
            total += len(pq)
            if y is None:
                labelled = False
            else:
                y = y.to(device)
                correct_q += int((pq == y).sum())
                correct_i += int((pi == y).sum())
    finally:
        codes.remove()
        qnet.train(was)
    rows = [_row(name, "shift" if req.shift is not None else "requant", codes.local[name], codes.e2e[name])
            for name, req in layers]
    rows.append(_row("output (logits, in LSB)", "logits", out_local, out_e2e))
    return Comparison(rows, total, 100.0 * agree / max(total, 1),
                      100.0 * correct_q / total if labelled and total else None,
                      100.0 * correct_i / total if labelled and total else None,
                      "integer reference" if integer_ref else "fake-quant")


class _LayerCodes:
    """Forward hooks on both networks: the reference's output codes per requantization (``round(y / eps)``,
    or the codes of an integer reference), and each requantization of the integer network compared with them:
    fed them while ``forcing`` (layer by layer, ``local``), left alone otherwise (end to end, ``e2e``)."""

    def __init__(self, qmods: dict, layers: list, integer_ref: bool):
        self.local = {n: _Tally() for n, _ in layers}
        self.e2e = {n: _Tally() for n, _ in layers}
        self.ref: dict[str, torch.Tensor] = {}
        self.forcing = True
        self.handles = []
        for name, req in layers:
            self.handles.append(qmods[name].register_forward_hook(self._ref_hook(name, req.eps_out,
                                                                                 integer_ref)))
            self.handles.append(req.register_forward_hook(self._int_hook(name)))

    def _ref_hook(self, name: str, eps, integer_ref: bool):
        def hook(_m, _inputs, output):
            self.ref[name] = output if integer_ref else torch.round(output.double() / eps).to(torch.int64)
        return hook

    def _int_hook(self, name: str):
        def hook(_m, _inputs, output):
            if self.forcing:
                self.local[name].add(self.ref[name], output)
                return self.ref[name]
            self.e2e[name].add(self.ref[name], output)
            return None
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _row(name: str, kind: str, local: _Tally, e2e: _Tally) -> dict:
    return {"layer": name, "kind": kind, "elements": local.n, "identical": local.share,
            "mismatches": local.n - local.same, "max_diff": local.worst, "e2e_identical": e2e.share,
            "e2e_max_diff": e2e.worst}
