"""The order a run draws its batches in, as a position that a training state saves and restores."""
from __future__ import annotations

import torch

from ..data.buckets import BucketBatchSampler
from ..data.dataset import KleinDataset


class BatchOrder:
    """Endless index batches whose position can be saved and restored, so a resumed run sees the same batches.

    One size, no repeats: every image once per epoch in an order drawn from the run's generator (the
    remainder of the current permutation is the position). Several sizes (aspect buckets) or repeats:
    the batches of BucketBatchSampler, one bucket at a time, reshuffled per epoch (epoch and index
    within it are the position).
    """

    def __init__(self, dataset: KleinDataset, batch_size: int, generator: torch.Generator, seed: int) -> None:
        assignment = dataset.bucket_assignment()
        self.plain = len(assignment) == 1 and dataset.repeats == 1
        self.n, self.batch_size, self.generator = len(dataset), batch_size, generator
        self.sampler = None if self.plain else BucketBatchSampler(assignment, batch_size, seed=seed,
                                                                  repeats=dataset.repeats)
        self.order: list[int] = []
        self.epoch, self.pos = 0, 0
        self._epoch: list[list[int]] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        if self.plain:
            while len(self.order) < self.batch_size:
                self.order += torch.randperm(self.n, generator=self.generator).tolist()
            out, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
            return out
        while True:
            if self._epoch is None:
                self._epoch = self.sampler.batches(self.epoch)
            if self.pos < len(self._epoch):
                self.pos += 1
                return self._epoch[self.pos - 1]
            self.epoch, self.pos, self._epoch = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"plain": self.plain, "order": list(self.order), "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        """A changed batch size keeps the epoch; the position within it then counts batches of the new size."""
        if state["plain"] != self.plain:
            raise ValueError("resume_from: the saved batch order is for a dataset with "
                             f"{'one size' if state['plain'] else 'several sizes or repeats'}, this one has "
                             f"{'one size' if self.plain else 'several sizes or repeats'}: resume with the same dataset.")
        self.order, self.epoch, self.pos, self._epoch = list(state["order"]), state["epoch"], state["pos"], None
