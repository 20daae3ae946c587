"""The order in which a run reads its samples: a pure function of (seed, epoch, process rank, process count).

Why a sampler of our own instead of ``DataLoader(shuffle=True, generator=...)``: a generator advances from epoch
to epoch and that state is not in Lightning's checkpoints, so a run resumed from ``last.ckpt`` would read epoch
``e`` in another order than the uninterrupted run did. Here epoch ``e`` is always ``randperm(n)`` drawn from a
generator seeded by ``(seed, e)``; Lightning calls :meth:`EpochOrder.set_epoch` before every epoch (also after a
resume), so a resumed run replays the uninterrupted one exactly.

Data-parallel training (DDP) reads the *same global batches* as one process: the epoch's order is cut into global
batches of ``batch_size`` (the configured ``data.batch_size``), and process ``r`` of ``W`` reads the ``r``-th
contiguous slice of ``batch_size / W`` samples of each. The loss is a mean over a batch and DDP averages the
processes' gradients, so equal slices give exactly the gradient of the global batch's mean. That needs equal
slices, hence two rules: ``batch_size`` must be divisible by ``W``, and the incomplete last batch of an epoch is
dropped (a tail of 3 samples cannot be split equally over 2 processes; with one process it is dropped too, so
both read the same batches). The dropped tail changes every epoch with the permutation, so no sample is left out
for good. Evaluation stages are not batched globally: process ``r`` reads positions ``r, r + W, ...`` (every
sample exactly once over the processes, no padding duplicates, unlike ``DistributedSampler``), and the metrics'
states are summed over processes.

The class derives from ``DistributedSampler`` only so that Lightning leaves it in place under DDP (it replaces
any sampler that is not one); none of the parent's logic is used.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch ``epoch`` of a run seeded ``seed`` (distinct pairs give unrelated streams)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochOrder(DistributedSampler):
    """Sample indices of one process for one epoch (see the module docstring).

    Args:
        n: dataset length.
        seed: the run's seed (``cfg.seed``); with ``epoch`` it fixes the permutation.
        shuffle: permute (training) or keep the dataset order (evaluation).
        batch_size: the global batch size; given, the order is cut into global batches (incomplete tail dropped)
            and this process reads its slice of each; None = evaluation layout (every ``world_size``-th sample).
        rank, world_size: this process and the process count (default: the initialised process group, else 0, 1).
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        shuffle: bool,
        batch_size: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if rank is None or world_size is None:
            rank, world_size = process_group()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size is not None and (batch_size < 1 or batch_size % world_size):
            raise ValueError(
                f"data.batch_size={batch_size} must be a positive multiple of the number of processes "
                f"({world_size}): each process reads batch_size / processes samples of every global batch"
            )
        # no super().__init__: it wants a dataset and a process group; Lightning only checks the type
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.batch_size, self.rank, self.num_replicas = batch_size, int(rank), int(world_size)
        self.epoch = 0

    @property
    def per_process_batch(self) -> int | None:
        """Samples per batch in this process (``batch_size / world_size``), None in evaluation layout."""
        return None if self.batch_size is None else self.batch_size // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; the next iteration reads that epoch's order."""
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        """The whole epoch's order over all processes: [n] indices."""
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))

    def indices(self) -> list[int]:
        """This process's indices for the current epoch, in reading order."""
        order = self.order()
        if self.batch_size is None:
            return order[self.rank :: self.num_replicas].tolist()
        full = (self.n // self.batch_size) * self.batch_size
        b = self.per_process_batch
        # [global batches, processes, b]: process r takes slice r of every global batch
        return order[:full].view(-1, self.num_replicas, b)[:, self.rank].reshape(-1).tolist()

    def __iter__(self) -> Iterator[int]:
        # computed when iteration starts (not when the iterator is made), so a set_epoch in between counts
        yield from self.indices()

    def __len__(self) -> int:
        if self.batch_size is None:
            return len(range(self.rank, self.n, self.num_replicas))
        return (self.n // self.batch_size) * self.per_process_batch
