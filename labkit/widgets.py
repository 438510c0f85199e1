"""Per-layer bit-width editor (ipywidgets): one row per quantized layer, bulk actions, live totals, saving.

The editor edits a :class:`labkit.bitwidths.BitPlan`; every change goes through the plan, so what the rows
show, the totals and the saved config always agree. The saved JSON is a complete config that
``labkit train`` accepts.
"""

from __future__ import annotations

from pathlib import Path

import ipywidgets as W

from labkit.bitwidths import BitPlan
from labkit.paths import resolve
from labkit.schema import MAX_BITS, MIN_BITS

BULK_TARGETS = ("all layers", "depthwise", "pointwise", "first and last")


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.3f} MiB" if n_bytes >= 2**16 else f"{n_bytes / 1024:.1f} KiB"


class BitWidthEditor:
    """``BitWidthEditor(base_config)``; display ``editor.widget``; ``editor.config()`` / ``editor.save(path)``.
    The plan starts as the PACT/TQT ``base_config`` stands."""

    def __init__(self, base_config: dict):
        self.base_config = base_config
        self.plan = BitPlan.from_config(base_config)
        self.rows: dict[str, tuple[W.BoundedIntText, W.BoundedIntText, W.Checkbox]] = {}
        self.totals = W.HTML()
        self.message = W.HTML()
        self.widget = W.VBox([self._bulk_bar(), self.totals, self.message, self._table(), self._save_bar()])
        self._refresh()

    @classmethod
    def start(cls, base_config: dict, bits: int | None = None, first_last_bits: int | None = None,
              depthwise_bits: int | None = None) -> "BitWidthEditor":
        """An editor whose plan starts from bulk settings: every layer at ``bits``, then the first and last
        layer at ``first_last_bits``, then the depthwise layers at ``depthwise_bits`` (None: unchanged)."""
        editor = cls(base_config)
        for target, b in (("all layers", bits), ("first and last", first_last_bits), ("depthwise", depthwise_bits)):
            if b:
                editor.apply_bulk(target, b, b)
        return editor

    # ------------------------------------------------------------------ building
    def _bits_box(self, value: int, disabled: bool = False) -> W.BoundedIntText:
        return W.BoundedIntText(value=value, min=MIN_BITS, max=MAX_BITS, disabled=disabled,
                                layout=W.Layout(width="70px"))

    def _table(self) -> W.VBox:
        head = W.HBox([W.HTML(f"<b>{t}</b>", layout=W.Layout(width=w)) for t, w in
                       (("layer", "300px"), ("type", "90px"), ("W bits", "70px"), ("A bits", "70px"),
                        ("per-channel", "90px"))])
        lines = [head]
        for row in self.plan.rows:
            w = self._bits_box(row.w_bits)
            a = self._bits_box(row.a_bits or 8, disabled=row.act is None)
            pc = W.Checkbox(value=row.per_channel, disabled=row.kind == "linear", indent=False,
                            layout=W.Layout(width="90px"))
            for box in (w, a, pc):
                box.observe(lambda change, name=row.name: self._on_row_change(name), names="value")
            self.rows[row.name] = (w, a, pc)
            lines.append(W.HBox([W.Label(row.name, layout=W.Layout(width="300px")),
                                 W.Label(row.kind, layout=W.Layout(width="90px")), w, a, pc]))
        # display "block": a height-limited flex column would squeeze every row to a few pixels in the browser
        return W.VBox(lines, layout=W.Layout(max_height="420px", overflow="auto", display="block"))

    def _bulk_bar(self) -> W.HBox:
        self.bulk_target = W.Dropdown(options=BULK_TARGETS, value="all layers", description="set",
                                      layout=W.Layout(width="220px"))
        self.bulk_w = self._bits_box(4)
        self.bulk_a = self._bits_box(4)
        self.bulk_apply = W.Button(description="apply", button_style="primary", layout=W.Layout(width="80px"))
        self.bulk_apply.on_click(lambda _: self.apply_bulk(self.bulk_target.value, self.bulk_w.value, self.bulk_a.value))
        return W.HBox([self.bulk_target, W.Label("W"), self.bulk_w, W.Label("A"), self.bulk_a, self.bulk_apply])

    def _save_bar(self) -> W.HBox:
        self.save_path = W.Text(value="configs/embedded/config.custom.json", description="save to",
                                layout=W.Layout(width="460px"))
        self.save_button = W.Button(description="save config", button_style="success")
        self.save_button.on_click(lambda _: self._save_clicked())
        return W.HBox([self.save_path, self.save_button])

    # ------------------------------------------------------------------ events
    def _on_row_change(self, name: str) -> None:
        if getattr(self, "_syncing", False):
            return
        w, a, pc = self.rows[name]
        try:
            self.plan.set(name, w.value, a.value, pc.value)
            self.message.value = ""
        except ValueError as err:
            self.message.value = f"<span style='color:#b00'>{err}</span>"
        self._refresh()

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

    def _sync_rows(self) -> None:
        self._syncing = True
        try:
            for row in self.plan.rows:
                w, a, pc = self.rows[row.name]
                w.value, a.value, pc.value = row.w_bits, row.a_bits or a.value, row.per_channel
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

    def _save_clicked(self) -> None:
        try:
            path = self.save(self.save_path.value)
            self.message.value = f"saved <code>{path}</code>: <code>labkit train {path}</code>"
        except (OSError, ValueError) as err:
            self.message.value = f"<span style='color:#b00'>not saved: {err}</span>"

    # ------------------------------------------------------------------ results
    def config(self) -> dict:
        """The complete config: ``base_config`` with the plan's bits in its per-layer entries."""
        return self.plan.apply_to(self.base_config, self.description())

    def description(self) -> str:
        base = self.base_config.get("name", "the base config")
        return f"Mixed precision ({self.plan.describe()}) edited in the bit-width editor from {base}"

    def save(self, path: str | Path) -> Path:
        return self.plan.save(self.base_config, resolve(path), self.description())
