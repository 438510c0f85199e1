"""Checkpoints written before the quantizers were split into PACT and TQT grids still load and compute the
same.

``data/legacy_quantizers.pt`` holds the state dicts of a PACT and a TQT :class:`helpers.SmallNet` trained for
three steps by labkit 612884e (``data/make_legacy_checkpoints.py``), an input and each network's output."""

from __future__ import annotations


import pytest
import torch

from labkit.quant import quantizers

from helpers import ROOT, small_quantized_net

LEGACY = ROOT / "tests" / "data" / "legacy_quantizers.pt"


def build(tqt: bool) -> torch.nn.Module:
    """The generator's network, untrained: per-channel conv weights, every quantizer PACT or TQT."""
    return small_quantized_net(tqt).eval()


@pytest.fixture(scope="module")
def legacy() -> dict:
    return torch.load(LEGACY, weights_only=True)


@pytest.mark.parametrize("kind", ["pact", "tqt"])
def test_legacy_state_dict_loads_and_computes_the_same(legacy, kind):
    net = build(kind == "tqt")
    net.load_state_dict(legacy[kind])  # strict: every key known, none missing
    assert all(q.started for _, q in quantizers(net)) and len(quantizers(net)) == 10
    with torch.no_grad():
        assert torch.equal(net(legacy["x"]), legacy[f"y_{kind}"])
    saved = net.state_dict()
    assert list(saved) == list(legacy[kind])  # the same keys in the same order
    assert all(torch.equal(saved[k], v) for k, v in legacy[kind].items())
    again = build(kind == "tqt")
    again.load_state_dict(saved)
    with torch.no_grad():
        assert torch.equal(again(legacy["x"]), legacy[f"y_{kind}"])
