import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from labkit.train.distributed import SyncBatchNorm2d, convert_sync_batchnorm, shutdown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    x, w = torch.randn(8, 4, 3, 3) * 3 + 1, torch.randn(8, 4, 3, 3)
    bn = SyncBatchNorm2d(4)
    local = x[rank * 4:(rank + 1) * 4].clone().requires_grad_()
    y = bn(local)
    (y * w[rank * 4:(rank + 1) * 4]).sum().backward()
    torch.save({"y": y.detach(), "grad": local.grad, "running_var": bn.running_var}, f"{out}/{rank}.pt")
    shutdown()


@pytest.mark.slow
def test_sync_batchnorm_equals_full_batch_batchnorm_over_gloo(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    torch.manual_seed(0)
    x, w = torch.randn(8, 4, 3, 3) * 3 + 1, torch.randn(8, 4, 3, 3)
    ref = nn.BatchNorm2d(4)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * w).sum().backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        rows = slice(rank * 4, (rank + 1) * 4)
        assert torch.allclose(got["y"], y_ref[rows].detach(), atol=1e-5)
        assert torch.allclose(got["grad"], xr.grad[rows], atol=1e-5)
        assert torch.allclose(got["running_var"], ref.running_var, atol=1e-6)


def test_convert_keeps_state_and_is_plain_batchnorm_outside_ddp():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    net[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    convert_sync_batchnorm(net)
    assert type(net[1]) is SyncBatchNorm2d and isinstance(net[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(net(x), nn.functional.batch_norm(net[0](x), None, None, net[1].weight, net[1].bias,
                                                           training=True), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sync_batchnorm_normalises_half_inputs_in_float32(monkeypatch, dtype):
    """Under AMP the conv output is half precision; 2 x 256 x 256 = 131072 values per channel overflow a
    float16 count or sum (max 65504). One process stands in for the group (the all-reduce of one is
    itself)."""
    import labkit.train.distributed as ld

    monkeypatch.setattr(ld, "is_distributed", lambda: True)
    monkeypatch.setattr(ld._AllReduceSum, "apply", staticmethod(lambda t: t))
    torch.manual_seed(0)
    x = (torch.randn(2, 2, 256, 256) * 3 + 1).to(dtype)
    bn, ref = SyncBatchNorm2d(2), nn.BatchNorm2d(2)
    y, y_ref = bn(x), ref(x.float())
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert torch.allclose(y.float(), y_ref, atol=2e-2)
    assert torch.allclose(bn.running_var, ref.running_var, rtol=1e-4)
