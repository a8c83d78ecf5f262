"""Deterministic, resumable batches: the global sample order is fixed by the dataset (which
megatron already shuffles with the run's seed), so the iterator's position is just the
number of samples consumed. Each iteration consumes one global batch; each data-parallel
rank reads its contiguous slice of every micro-batch group, as Megatron-LM's
``MegatronPretrainingSampler`` does."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from moepp_megatron.signals import stop_signals_deferred

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class PretrainingBatchSampler(Sampler[list[int]]):
    def __init__(
        self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> None:
        if consumed_samples >= total_samples:
            raise ValueError(f"consumed_samples={consumed_samples} >= dataset size {total_samples}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // (self.micro_batch_size * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        group = self.micro_batch_size * self.dp_size
        start = self.dp_rank * self.micro_batch_size
        for first in range(self.consumed_samples, self.total_samples - group + 1, group):
            yield list(range(first + start, first + start + self.micro_batch_size))


def _collate(samples: list[dict]) -> dict:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in BATCH_KEYS}


class DataIterator:
    """Micro-batches from a DataLoader whose worker processes never receive the stop signals
    (see :mod:`moepp_megatron.signals`); :meth:`close` stops them. Close it: the
    workers ignore the SIGTERM with which multiprocessing's exit handler would end them."""

    def __init__(self, loader: DataLoader) -> None:
        with stop_signals_deferred():  # the workers start here
            self._batches = iter(loader)

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict:
        return next(self._batches)

    def close(self) -> None:
        # torch has no public close; this is what its iterator's __del__ calls.
        shutdown = getattr(self._batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def build_data_iterator(
    dataset: Dataset, *, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
    num_workers: int,
) -> DataIterator:
    """Micro-batches for this data-parallel rank, starting after ``consumed_samples``."""
    sampler = PretrainingBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate,
        persistent_workers=num_workers > 0,
    )
    return DataIterator(loader)
