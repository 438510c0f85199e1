"""Writes ``legacy_quantizers.pt``: state dicts of a PACT and a TQT network (tests/helpers.SmallNet) as labkit
612884e stored them (bounds as parameters on each quantized module), with an input and each network's
output, so that tests/test_checkpoint_compat.py can check that today's code loads them and computes the same.
Run once, at that commit: ``PYTHONPATH=. python tests/data/make_legacy_checkpoints.py``."""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from labkit.quant import quantizers  # noqa: E402
from labkit.quant.optimizers import normalize_tqt_grads, tqt_modules  # noqa: E402

from helpers import small_quantized_net  # noqa: E402


def trained(tqt: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    net = small_quantized_net(tqt)
    net.train()
    x = torch.randn(16, 3, 6, 6)
    net(x)  # activation statistics
    for _, q in quantizers(net):
        q.start()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        net(x).square().mean().backward()
        normalize_tqt_grads(tqt_modules(net))
        opt.step()
    return net.eval()


if __name__ == "__main__":
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    out = {"x": x}
    for name in ("pact", "tqt"):
        net = trained(name == "tqt")
        out[name] = net.state_dict()
        with torch.no_grad():
            out[f"y_{name}"] = net(x)
    torch.save(out, HERE / "legacy_quantizers.pt")
    print({k: len(v) if isinstance(v, dict) else tuple(v.shape) for k, v in out.items()})
