"""Multi-process training under ``torchrun``: process group, rank helpers, batch-norm statistics sync."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(device_type: str) -> tuple[int, int, int, bool]:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1).

    Returns ``(rank, world, local_rank, created)``; ``created`` says this call made the group (and so whoever
    called it should :func:`shutdown` it).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created


def shutdown(clean: bool = True) -> None:
    """Leave the process group (after a barrier when ``clean``): a gloo group left alive aborts the process
    at interpreter exit."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes (identity in a single process)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class _AllReduceSum(torch.autograd.Function):
    """``y = sum over processes of x``; its gradient is the sum over processes of ``dL/dy``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across all processes.

    ``mean = sum(x) / N``, ``var = sum((x - mean)^2) / N`` with sums all-reduced (autograd-aware), so any
    backend works (gloo on CPU too, unlike ``nn.SyncBatchNorm``). Half-precision inputs (AMP) are normalised
    in float32 (a float16 N or sum overflows at 65504) and returned in their dtype. Outside distributed
    training it is a plain BatchNorm2d; its state dict is the same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        if x.dtype in (torch.float16, torch.bfloat16):
            return self.forward(x.float()).to(x.dtype)
        all_reduce = _AllReduceSum.apply
        dims = (0, 2, 3)
        c = x.shape[1]
        count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dims), count]))
        n = sums[-1]
        mean = sums[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = all_reduce((centred * centred).sum(dims)) / n  # two passes: no E[x^2] - mean^2 cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        shape = (1, c, 1, 1)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.BatchNorm2d`` of ``module`` into a ``SyncBatchNorm2d`` in place (same state)."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
    return module


