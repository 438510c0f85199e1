"""Per-layer bit-width editor (ipywidgets): one row per quantized layer, bulk actions, live totals, saving.

The editor edits a :class:`labkit.precision.bitplan.BitPlan`; every change goes through the plan, so what the
rows show, the totals, the cost table and chart below (:attr:`BitWidthEditor.outputs`) and the save status
always agree. A value outside 2..16 bits is refused with a message next to its box (the plan keeps the last
valid value). **propose** fills the rows with the optimal bits for a budget
(:func:`labkit.precision.allocate.propose`); they stay editable. The saved JSON is a complete config that
``labkit train`` accepts; its name and description state the plan.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ipywidgets as W

from labkit.config.budget import format_budget, parse_budget
from labkit.config.errors import LabkitError
from labkit.config.paths import resolve
from labkit.config.spec import MAX_BITS, MIN_BITS
from labkit.lab.steps import ensure_pretrained
from labkit.precision.allocate import Allocation, propose
from labkit.precision.bitplan import BitPlan
from labkit.precision.sensitivity import DEFAULT_BITS
from labkit.train.checkpoint import write_text_atomic

BULK_TARGETS = ("all layers", "depthwise", "pointwise", "first and last")
DEFAULT_SAVE = "runs/mixed/config.mixed.json"
COLUMNS = (("layer", "300px"), ("type", "90px"), ("W bits", "70px"), ("A bits", "70px"),
           ("per-channel", "90px"))
RED = "color:#b00"


class _Text(W.HTML):
    """An HTML widget whose plain-text form (a saved notebook's fallback) is its text, not the widget's
    repr."""

    def __repr__(self) -> str:
        return re.sub(r"<[^>]+>", "", self.value)


class _Box(W.VBox):
    """A VBox whose plain-text form is ``text``."""

    def __init__(self, children, text: str):
        super().__init__(children)
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.3f} MiB" if n_bytes >= 2**16 else f"{n_bytes / 1024:.1f} KiB"


class BitWidthEditor:
    """``BitWidthEditor(base_config)``; display the editor itself (or ``editor.widget``) and
    ``editor.outputs``; ``editor.config()`` / ``editor.save(path)``. The plan starts as the PACT/TQT
    ``base_config`` stands."""

    def __init__(self, base_config: dict, save_to: str | Path = DEFAULT_SAVE):
        self.base_config = base_config
        self.plan = BitPlan.from_config(base_config)
        self.rows: dict[str, tuple[W.IntText, W.IntText, W.Checkbox]] = {}
        self.notes: dict[str, W.HTML] = {}
        self.totals = W.HTML()
        self.message = W.HTML()
        self.saved: tuple[Path, dict] | None = None
        self.save_status = _Text()
        self.summary = _Text()  # the plan's key numbers (notebook 06's last cell), follows every edit
        self.costs = W.HTML()
        self.chart = W.HTML()
        self.outputs = _Box([self.chart, self.costs], "per-layer memory and BOPs (bars) and the cost table")
        self.proposal: Allocation | None = None
        self.propose_settings = {"bits": DEFAULT_BITS, "n_calib": 64}
        self.widget = W.VBox([self._propose_bar(), self._bulk_bar(), self.totals, self.message, self._head(),
                              self._table(), self._save_bar(save_to)])
        self._refresh()

    @classmethod
    def start(cls, base_config: dict, bits: int | None = None, first_last_bits: int | None = None,
              depthwise_bits: int | None = None, save_to: str | Path = DEFAULT_SAVE) -> BitWidthEditor:
        """An editor whose plan starts from bulk settings: every layer at ``bits``, then the first and last
        layer at ``first_last_bits``, then the depthwise layers at ``depthwise_bits`` (None: unchanged)."""
        editor = cls(base_config, save_to)
        for target, b in (("all layers", bits), ("first and last", first_last_bits),
                          ("depthwise", depthwise_bits)):
            if b:
                editor.apply_bulk(target, b, b)
        return editor

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = f"bit-width editor: {len(self.rows)} layers, {self.plan.describe()}"
        return bundle

    # ------------------------------------------------------------------ building
    def _bits_box(self, value: int, disabled: bool = False) -> W.IntText:
        return W.IntText(value=value, disabled=disabled, layout=W.Layout(width="70px"))

    def _head(self) -> W.HBox:
        """The column titles, outside the scrolling rows so that they stay in view."""
        return W.HBox([W.HTML(f"<b>{t}</b>", layout=W.Layout(width=w)) for t, w in COLUMNS])

    def _table(self) -> W.VBox:
        lines = []
        for row in self.plan.rows:
            w = self._bits_box(row.w_bits)
            a = self._bits_box(row.a_bits or 8, disabled=row.act is None)
            pc = W.Checkbox(value=row.per_channel, disabled=row.kind == "linear", indent=False,
                            layout=W.Layout(width="90px"))
            for box in (w, a, pc):
                box.observe(lambda change, name=row.name: self._on_row_change(name), names="value")
            self.rows[row.name] = (w, a, pc)
            self.notes[row.name] = W.HTML()
            lines.append(W.HBox([W.Label(row.name, layout=W.Layout(width="300px")),
                                 W.Label(row.kind, layout=W.Layout(width="90px")), w, a, pc,
                                 self.notes[row.name]]))
        # display "block": a height-limited flex column would squeeze every row to a few pixels in the browser
        return W.VBox(lines, layout=W.Layout(max_height="420px", overflow="auto", display="block"))

    def _bulk_bar(self) -> W.HBox:
        self.bulk_target = W.Dropdown(options=BULK_TARGETS, value="all layers", description="set",
                                      layout=W.Layout(width="220px"))
        self.bulk_w = self._bits_box(4)
        self.bulk_a = self._bits_box(4)
        self.bulk_note = W.HTML()
        self.bulk_apply = W.Button(description="apply", button_style="primary", layout=W.Layout(width="80px"))
        self.bulk_apply.on_click(lambda _: self._bulk_clicked())
        return W.HBox([self.bulk_target, W.Label("W"), self.bulk_w, W.Label("A"), self.bulk_a,
                       self.bulk_apply,
                       self.bulk_note])

    def _propose_bar(self) -> W.VBox:
        self.budget_box = W.Text(value="", placeholder="weight_bytes=uniform:3,act_bytes=uniform:3",
                                 description="budget", layout=W.Layout(width="460px"))
        self.propose_button = W.Button(description="propose", button_style="info",
                                       layout=W.Layout(width="90px"))
        self.propose_button.on_click(lambda _: self._propose_clicked())
        self.propose_status = _Text()
        return W.VBox([W.HBox([self.budget_box, self.propose_button]), self.propose_status])

    def _save_bar(self, save_to: str | Path) -> W.VBox:
        self.save_path = W.Text(value=str(save_to), description="save to", layout=W.Layout(width="460px"))
        self.save_button = W.Button(description="save config", button_style="success")
        self.save_button.on_click(lambda _: self._save_clicked())
        return W.VBox([W.HBox([self.save_path, self.save_button]), self.save_status])

    # ------------------------------------------------------------------ events
    def _on_row_change(self, name: str) -> None:
        if getattr(self, "_syncing", False):
            return
        w, a, pc = self.rows[name]
        bad = [f"{what} {box.value} bit{'s' * (box.value != 1)}" for what, box in (("W", w), ("A", a))
               if not box.disabled and not MIN_BITS <= box.value <= MAX_BITS]
        if bad:
            self.notes[name].value = (
                f"<span style='{RED}'>{', '.join(bad)}: choose {MIN_BITS} to {MAX_BITS}</span>"
            )
            return  # the plan keeps its last valid bits
        try:
            self.plan.set(name, w.value, a.value if not a.disabled else None, pc.value)
            self.notes[name].value = self.message.value = ""
        except ValueError as err:
            self.notes[name].value = f"<span style='{RED}'>{err}</span>"
        self._refresh()

    def _bulk_clicked(self) -> None:
        bad = [f"{what} {box.value}" for what, box in (("W", self.bulk_w), ("A", self.bulk_a))
               if not MIN_BITS <= box.value <= MAX_BITS]
        if bad:
            self.bulk_note.value = (
                f"<span style='{RED}'>{', '.join(bad)} bits: choose {MIN_BITS} to {MAX_BITS}</span>"
            )
            return
        self.bulk_note.value = ""
        self.apply_bulk(self.bulk_target.value, self.bulk_w.value, self.bulk_a.value)

    def apply_bulk(self, target: str, w_bits: int, a_bits: int) -> None:
        """Bulk action: ``target`` in :data:`BULK_TARGETS`."""
        if target == "all layers":
            self.plan.set_all(w_bits, a_bits)
        elif target == "first and last":
            self.plan.set_first_last(w_bits, a_bits)
        elif target in ("depthwise", "pointwise"):
            self.plan.set_kind(target, w_bits, a_bits)
        else:
            raise ValueError(f"unknown bulk target {target!r}; choose one of {BULK_TARGETS}")
        self._sync_rows()

    def _propose_clicked(self) -> None:
        try:
            self.propose(self.budget_box.value, **self.propose_settings)
        except LabkitError as err:
            self.propose_status.value = f"<span style='{RED}'>{err}</span>"

    def propose(self, budget, bits=DEFAULT_BITS, n_calib: int = 64) -> Allocation:
        """Fill the plan with the bits :func:`labkit.precision.allocate.propose` chooses for ``budget`` (the
        sensitivity of the base config's pretrained checkpoint at ``bits`` on ``n_calib`` training images,
        cached beside it); the rows stay editable. Returns the
        :class:`~labkit.precision.allocate.Allocation`."""
        self.propose_settings = {"bits": tuple(bits), "n_calib": n_calib}
        self.propose_status.value = (
            "measuring the sensitivity (cached after the first time) and allocating ..."
        )
        ensure_pretrained(self.base_config)  # the embedded FP32 run is trained first when missing
        allocation = propose(self.base_config, budget, bits=bits, n_calib=n_calib)
        self.plan.w_bits.update(allocation.plan.w_bits)
        self.plan.a_bits.update(allocation.plan.a_bits)
        self.proposal = allocation
        self.budget_box.value = format_budget(parse_budget(budget))
        self._sync_rows()
        totals = self.plan.totals()
        within = ", ".join(f"{metric} {int(totals[metric]):,} &le; {limit:,}"
                           for metric, limit in allocation.budget.items())
        self.propose_status.value = (f"proposed for <code>{self.budget_box.value}</code>: {within}; "
                                     f"predicted calibration-loss increase {allocation.objective:.4f}")
        return allocation

    def _sync_rows(self) -> None:
        self._syncing = True
        try:
            for row in self.plan.rows:
                w, a, pc = self.rows[row.name]
                w.value, a.value, pc.value = row.w_bits, row.a_bits or a.value, row.per_channel
                self.notes[row.name].value = ""
        finally:
            self._syncing = False
        self._refresh()

    def _refresh(self) -> None:
        t = self.plan.totals()
        self.totals.value = (
            f"<b>weights</b> {_mib(t['weight_bytes'])} ({t['compression']:.1f}x smaller than FP32) · "
            f"<b>activations</b> {_mib(t['act_bytes'])} in all, largest {_mib(t['peak_act_bytes'])} · "
            f"<b>BOPs</b> {t['BOPs'] / 1e9:.2f} G ({100 * t['bops_vs_fp32']:.2f}% of FP32) · "
            f"input {'x'.join(map(str, self.plan.input_shape[1:]))}")
        self.summary.value = (f"<b>{self.name()}</b>: {self.plan.describe()}; weights "
                              f"{int(t['weight_bytes']):,} bytes ({t['compression']:.1f}x smaller than "
                              f"FP32), activations {int(t['act_bytes']):,} bytes, "
                              f"{100 * t['bops_vs_fp32']:.2f}% of FP32's BOPs")
        costs = self.plan.costs()
        self.costs.value = cost_html(costs, t)
        self.chart.value = cost_bars(costs)
        self._update_save_status()

    def _update_save_status(self) -> None:
        if self.saved is None:
            self.save_status.value = "not saved yet: <b>save config</b> writes the plan above"
        elif self.saved[1] != self.config():
            self.save_status.value = (f"<span style='{RED}'>edited since saved to "
                                      f"<code>{self.saved[0]}</code>: <b>save config</b> again</span>")
        else:
            path = self.saved[0]
            self.save_status.value = (
                f"saved <code>{path}</code> ({self.name()}): <code>labkit train {path}</code>"
            )

    def _save_clicked(self) -> None:
        try:
            self.save()
            self.message.value = ""
        except (OSError, ValueError) as err:
            self.message.value = f"<span style='{RED}'>not saved: {err}</span>"

    # ------------------------------------------------------------------ results
    def name(self) -> str:
        """The saved config's name: the base's, ``mixed``, the bit ranges
        (``embedded-pact-mixed-W4-8-A4-8``)."""
        plan = self.plan.describe().removesuffix(" bits").replace("W ", "W").replace("A ", "A").replace(" / ",
                                                                                                        "-")
        return f"{self.base_config.get('name', 'config')}-mixed-{plan}"

    def config(self) -> dict:
        """The complete config: ``base_config`` with the plan's bits in its per-layer entries, named for the
        plan."""
        return {"name": self.name(), **self.plan.apply_to(self.base_config, self.description())}

    def description(self) -> str:
        base = self.base_config.get("name", "the base config")
        w, a = self.plan.w_bits.values(), [r.a_bits for r in self.plan.rows if r.a_bits]
        return (f"Mixed precision ({self.plan.describe()}; weights: {_counts(w)}; activations: {_counts(a)}) "
                f"edited in the bit-width editor from {base}")

    def save(self, path: str | Path | None = None) -> W.HTML:
        """Write :meth:`config` to ``path`` (default: the *save to* box) atomically; returns the save status,
        which follows later edits ("edited since saved")."""
        if path is not None:
            self.save_path.value = str(path)
        cfg = self.config()
        written = write_text_atomic(json.dumps(cfg, indent=4) + "\n", resolve(self.save_path.value))
        self.saved = (written, cfg)
        self._update_save_status()
        return self.save_status


def _counts(bits) -> str:
    """``{4: 51, 8: 2}`` as ``51 at 4 bits, 2 at 8``."""
    counts: dict[int, int] = {}
    for b in bits:
        counts[b] = counts.get(b, 0) + 1
    return ", ".join(f"{n} at {b}" for b, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def cost_html(costs: list[dict], totals: dict, max_height: str = "320px") -> str:
    """Per layer: bits, weight and activation bytes (integers), BOPs, and the plan's ``totals`` (activation
    bytes there include the quantizers that follow no layer); the header row stays in view."""
    head = "".join(f"<th style='position:sticky;top:0;background:var(--jp-layout-color1,#fff)'>{c}</th>"
                   for c in ("layer", "type", "W", "A", "weight bytes", "activation bytes", "BOPs"))
    body = "".join(
        f"<tr><td>{c['name']}</td><td>{c['kind']}</td><td>{c['w_bits']}</td><td>{c['a_bits'] or ''}</td>"
        f"<td>{int(c['weight_bytes']):,}</td><td>{int(c['act_bytes']):,}</td>"
        f"<td>{int(c['BOPs']):,}</td></tr>"
        for c in costs
    )
    total = {k: int(totals[k]) for k in ("weight_bytes", "act_bytes", "BOPs")}
    foot = (f"<tr><td><b>total</b></td><td></td><td></td><td></td><td><b>{total['weight_bytes']:,}</b></td>"
            f"<td><b>{total['act_bytes']:,}</b></td><td><b>{total['BOPs']:,}</b></td></tr>")
    return (f"<div style='max-height:{max_height};overflow:auto'><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}{foot}</tbody></table></div>")


def _bars(values: list[float], colour: str, title: str, unit: str, width: int = 520,
          height: int = 130) -> str:
    """An SVG bar chart, one bar per value (drawn in microseconds, so it follows every edit)."""
    top = max(values) or 1.0
    step = width / max(len(values), 1)
    bars = "".join(f"<rect x='{i * step:.1f}' y='{height - v / top * height:.1f}' "
                   f"width='{max(step - 1, 1):.1f}' height='{v / top * height:.1f}' "
                   f"fill='{colour}'><title>{v:,.0f} {unit}</title></rect>"
                   for i, v in enumerate(values))
    return (f"<div style='display:inline-block;margin-right:24px'><div><b>{title}</b> (largest {top:,.0f} "
            f"{unit})</div><svg width='{width}' height='{height}' style='border-bottom:1px solid "
            f"#888'>{bars}</svg><div style='font-size:80%;color:#666'>layers in network order (hover a bar "
            "for its value)</div></div>")


def cost_bars(costs: list[dict]) -> str:
    """Two bar charts per layer: memory (weight + activation bytes) and BOPs."""
    return (_bars([c["weight_bytes"] + c["act_bytes"] for c in costs], "#4c72b0", "memory per layer", "bytes")
            + _bars([c["BOPs"] for c in costs], "#55a868", "bit operations per layer", "BOPs"))
