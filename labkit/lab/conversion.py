"""torchvision weights -> a labkit checkpoint, as notebook 01 shows it: the key map, the logit check, the
file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from labkit.config.loading import load_config
from labkit.config.paths import resolve
from labkit.config.tables import Table
from labkit.lab.display import Lines
from labkit.models.torchvision import (conversion_error, demo_torchvision_state, from_torchvision, key_table,
                                       torchvision_hub_file)
from labkit.train.evaluate import evaluate_checkpoint
from labkit.train.pretrained import load_torchvision_weights, save_converted

@dataclass


class Conversion:
    """A torchvision -> labkit conversion: where the weights came from, the network, the check, the file."""

    source: str
    demo: bool
    state: dict
    net: nn.Module
    max_diff: float
    checkpoint: Path | None

    def summary(self) -> str:
        net = self.net
        s = (f"{self.source}: {len(self.state)} tensors -> MobileNetV2 capacity {net.capacity}, "
             f"{net.num_classes} classes; max |logit difference| to torchvision's network "
             f"{self.max_diff:.3g} ({'identical' if self.max_diff <= 1e-5 else 'DIFFERENT'})")
        if self.checkpoint:
            return s + f"; wrote {self.checkpoint} (use it as network.pretrained)"
        return (
            s
            + "; a random demo network, so no checkpoint was written (give the real weights file to"
            " convert it)"
        )

    def key_table(self, first: int = 12) -> Table:
        table = key_table(self.state)
        return Table(table.rows[:first], title=f"key map: first {first} of {len(table)} tensors")

    def what_we_saw(self) -> Lines:
        """The conversion's key numbers: tensors, network, the logit check, the file written (or why none)."""
        written = (f"wrote {self.checkpoint}: use it as network.pretrained" if self.checkpoint else
                   "no checkpoint written: the demo network's weights are random (give real weights to "
                   "convert them)")
        return Lines([f"{len(self.state)} torchvision tensors -> MobileNetV2 capacity {self.net.capacity}, "
                      f"{self.net.num_classes} classes", f"max |logit difference| {self.max_diff:.3g} "
                      f"({'identical' if self.max_diff <= 1e-5 else 'DIFFERENT'}: the bound is 1e-5)",
                      written],
                     f"what we saw: {self.source}")

    def _repr_html_(self) -> str:
        return f"<p>{self.summary()}</p>"

    def __repr__(self) -> str:
        return self.summary()


def convert_torchvision(weights: str | None, output_dir: str | Path) -> Conversion:
    """Convert torchvision weights (``weights``, else the torch hub cache, else a random demo network), check
    the logits against torchvision's own network, and write the checkpoint (real weights only)."""
    demo = weights is None and not torchvision_hub_file().is_file()
    state = demo_torchvision_state() if demo else load_torchvision_weights(weights and resolve(weights))
    net = from_torchvision(state).eval()
    diff = conversion_error(state, net)
    source = "random torchvision mobilenet_v2 (demo)" if demo else str(weights or torchvision_hub_file())
    path = None if demo else save_converted(net, resolve(output_dir) / f"mobilenetv2_{net.capacity}.ckpt",
                                            source)
    return Conversion(source, demo, state, net, diff, path)


def evaluate_converted(conversion: Conversion, config: str, data_root: str | None,
                       device: str = "auto") -> str:
    """Top-1 of converted weights on ImageNet (``data_root``), or why it is skipped."""
    if data_root is None:
        return "data_root not set: skipping the ImageNet evaluation"
    if conversion.checkpoint is None:
        return "a random demo network: nothing to evaluate on ImageNet"
    cfg = load_config(config, {"data.root": data_root, "network.pretrained": None})
    m = evaluate_checkpoint(conversion.checkpoint, cfg, device=device, progress=True)
    return f"converted weights: top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  ({m['n']} images)"
