"""Data loaders of a run: the global training batch split over processes, every validation sample once."""

from __future__ import annotations

from torch.utils.data import DataLoader, DistributedSampler, Sampler

from labkit.config.errors import LabkitError
from labkit.config.schema import Data


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...``: every sample evaluated exactly once across processes."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = range(rank, n, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_train_loader(data: Data, dataset, rank: int, world: int, seed: int, pin: bool) -> DataLoader:
    """Seeded DistributedSampler (one process too) over the global batch ``bs``: each rank gets
    ``bs/world``."""
    bs, workers = data.train_bs, data.train.dataloader.num_workers
    if bs % world:
        raise LabkitError(f"data.train.dataloader.bs = {bs} is not divisible by the {world} processes: the "
                          "batch size is global, choose a multiple of the process count")
    if len(dataset) < bs:
        raise LabkitError(f"the training set ({len(dataset)} images) is smaller than one batch ({bs}): lower "
                          "data.train.dataloader.bs")
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    # workers are started anew each epoch (not persistent): their seeds then come from the epoch's reseeded
    # global RNG (see labkit.train.loop), so augmentation after a resume matches the uninterrupted run
    return DataLoader(dataset, batch_size=bs // world, sampler=sampler, num_workers=workers, drop_last=True,
                      pin_memory=pin)


def make_val_loader(data: Data, dataset, rank: int = 0, world: int = 1, pin: bool = False) -> DataLoader:
    """Every validation sample exactly once across the processes (no padding, unlike DistributedSampler)."""
    return DataLoader(dataset, batch_size=max(1, data.valid_bs // world),
                      sampler=ShardSampler(len(dataset), rank, world),
                      num_workers=data.valid.dataloader.num_workers, pin_memory=pin)
