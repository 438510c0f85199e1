"""torchvision ``mobilenet_v2`` <-> labkit ``MobileNetV2`` weights. Nothing is downloaded.

Key map (all 314 keys map 1:1): ``features.0.*`` -> ``pilot.*``; ``features.N.*`` -> ``features.(N-1).*``;
``conv`` -> ``residual_branch``; block 0 ``.1`` -> ``.1.0`` and ``.2`` -> ``.1.1``; other blocks ``.2`` ->
``.2.0`` and ``.3`` -> ``.2.1``; ``classifier.1.*`` unchanged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from labkit.config.errors import CheckpointError
from labkit.config.tables import Table
from labkit.models import MobileNetV2

_BLOCK = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(.+)$")
_STEM_OR_HEAD = re.compile(r"^features\.(\d+)\.(\d+)\.(.+)$")
CAPACITIES = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


def torchvision_key(key: str) -> str:
    """Map one torchvision ``mobilenet_v2`` state-dict key to its labkit name."""
    if key.startswith("classifier."):
        return key
    block = _BLOCK.match(key)
    if block:
        n, k, rest = int(block[1]), int(block[2]), block[3]
        last = 1 if n == 1 else 2  # index of the project conv's first module in the torchvision block
        if k >= last:  # project conv (k == last) and its BN (k == last + 1) become one ConvBN group
            return f"features.{n - 1}.residual_branch.{last}.{k - last}.{rest}"
        return f"features.{n - 1}.residual_branch.{k}.{rest}"
    head = _STEM_OR_HEAD.match(key)
    if head:
        n, rest = int(head[1]), f"{head[2]}.{head[3]}"
        return f"pilot.{rest}" if n == 0 else f"features.{n - 1}.{rest}"
    raise CheckpointError(f"'{key}' is not a torchvision mobilenet_v2 state-dict key")


def key_table(state_dict: dict):
    """Table of torchvision key -> labkit key -> shape, one row per tensor."""
    return Table(({"torchvision": k, "labkit": torchvision_key(k), "shape": tuple(v.shape)}
                  for k, v in state_dict.items()), title="state-dict key map")


def is_torchvision_state_dict(state_dict: dict) -> bool:
    return any(k.startswith("features.0.0.") for k in state_dict) and not any(
        k.startswith("pilot.") for k in state_dict
    )


def from_torchvision(model_or_state_dict: nn.Module | dict, capacity: float | None = None,
                     config: str = "standard") -> MobileNetV2:
    """A labkit ``MobileNetV2`` carrying torchvision's weights (identical logits in eval mode).

    ``capacity`` (width) and ``num_classes`` are read off the tensor shapes when not given.
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict,
                                                           nn.Module) else model_or_state_dict
    mapped = {torchvision_key(k): v for k, v in state.items()}
    num_classes = mapped["classifier.1.weight"].shape[0]
    candidates = [capacity] if capacity is not None else CAPACITIES
    for width in candidates:
        net = MobileNetV2(capacity=width, num_classes=num_classes, config=config)
        if _shapes_match(net.state_dict(), mapped):
            net.load_state_dict(mapped, strict=True)
            return net
    raise CheckpointError(
        "the torchvision state dict matches no MobileNetV2 width "
        f"({', '.join(map(str, candidates))}): pass capacity= explicitly, or check the file")


def _shapes_match(reference: dict, state: dict) -> bool:
    return reference.keys() == state.keys() and all(reference[k].shape == state[k].shape for k in reference)


def torchvision_url() -> str:
    from torchvision.models import MobileNet_V2_Weights  # lazy: torchvision takes seconds to import

    return MobileNet_V2_Weights.IMAGENET1K_V1.url


def torchvision_hub_file() -> Path:
    """Where torchvision keeps ``mobilenet_v2`` IMAGENET1K_V1 weights in the local torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(torchvision_url())


@torch.no_grad()
def conversion_error(state: dict, net: MobileNetV2, batch: int = 4, size: int = 224) -> float:
    """Largest |logit difference| between torchvision's network with ``state`` and the converted ``net``
    (eval mode, a seeded random batch): 0 up to float rounding when the conversion is right."""
    import torchvision  # lazy: seconds to import, and only this check needs torchvision's model

    reference = torchvision.models.mobilenet_v2(width_mult=net.capacity, num_classes=net.num_classes).eval()
    reference.load_state_dict(state)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return float((reference(x) - net.eval()(x)).abs().max())


def demo_torchvision_state(seed: int = 0) -> dict:
    """A randomly initialised torchvision ``mobilenet_v2`` state dict (to see a conversion where the
    pretrained file is not at hand; nothing is downloaded)."""
    import torchvision  # lazy: as conversion_error

    torch.manual_seed(seed)
    return torchvision.models.mobilenet_v2().state_dict()
