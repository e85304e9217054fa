"""The training batches of every task, as one resumable iterable: kill at any step, resume exactly.

Per step every task gives ``batch_size_per_task`` unlabelled inputs; tasks with fewer batches cycle
(restarting their own epoch order), and an epoch has as many steps as the longest task. A run resumed
from a mid-epoch checkpoint draws exactly the batches the uninterrupted run would have drawn next: the
steps already done (Lightning's own batch progress, restored with its loops) are skipped by index,
without loading them.
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler


class _SkippingBatches(BatchSampler):
    """A BatchSampler whose next pass starts ``skip`` batches in (then every pass is whole)."""

    def __init__(self, sampler: DistributedSampler, batch_size: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


class _EpochFanout:
    """Forwards Lightning's ``set_epoch`` to every task's sampler."""

    def __init__(self, samplers: list[DistributedSampler]) -> None:
        self.samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)


class ResumableTaskBatches:
    """{task: batch} per training step, over per-task samplers, with a resumable position in the epoch.

    Args:
        datasets: Task name -> its unlabelled dataset.
        batch_size: Inputs of every task per step (and device).
        collate: Pads a list of items into a batch.
        world: Number of data-parallel processes (each takes every world-th index of the epoch order).
        rank: This process's rank.
        seed: Seed of the epoch orders (task i uses ``seed + i``).
        resume_at: Steps of the current epoch already done when an epoch's iteration starts (0 except
            when resuming mid-epoch).
        num_workers: DataLoader worker processes per task.
    """

    def __init__(
        self,
        datasets: Mapping[str, Dataset],
        batch_size: int,
        collate: Callable[[list[dict[str, Any]]], Any],
        world: int,
        rank: int,
        seed: int,
        resume_at: Callable[[], int],
        num_workers: int = 0,
    ) -> None:
        self.loaders: dict[str, DataLoader] = {}
        samplers = []
        for i, (task, ds) in enumerate(datasets.items()):
            # The order depends only on (seed, epoch), so a resumed run replays it; under DDP rank r takes
            # every world-th index, so the ranks' batches together equal the one-process batch.
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed + i)
            samplers.append(sampler)
            batches = _SkippingBatches(sampler, batch_size)
            self.loaders[task] = DataLoader(
                ds, batch_sampler=batches, collate_fn=collate, num_workers=num_workers
            )
        self.sampler = _EpochFanout(samplers)  # Lightning calls sampler.set_epoch at every epoch start
        self.resume_at = resume_at

    def __len__(self) -> int:
        """Steps per epoch: the longest task's number of batches."""
        return max(len(loader) for loader in self.loaders.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield {task: batch} for the rest of the epoch (all of it unless resumed mid-epoch)."""
        start = self.resume_at()
        if start >= len(self):  # the checkpoint closed its epoch: Lightning starts the next one
            start = 0
        iterators = {}
        for task, loader in self.loaders.items():
            loader.batch_sampler.skip = start % len(loader)  # type: ignore[union-attr]
            iterators[task] = iter(loader)
        for _ in range(start, len(self)):
            step = {}
            for task, loader in self.loaders.items():
                try:
                    step[task] = next(iterators[task])
                except StopIteration:  # a shorter task cycles: the same epoch order again
                    iterators[task] = iter(loader)
                    step[task] = next(iterators[task])
            yield step

    def state_dict(self) -> dict[str, int]:
        """Nothing beyond Lightning's own progress; having this protocol marks the loader resumable."""
        return {}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """The position comes from Lightning's restored batch progress (see ``resume_at``)."""
