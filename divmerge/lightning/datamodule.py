"""The LightningDataModule: unlabelled inputs of every task for merging, labelled inputs for evaluation."""

import functools
import math
from functools import cached_property
from typing import Any

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase

from divmerge.data import SPLITS, Rows, Split, TaskDataset, TaskSpec, check_task, load_splits
from divmerge.errors import DivMergeError
from divmerge.experts.classes import expert_class_names
from divmerge.experts.vocab import tokenizer_source
from divmerge.families.causal_lm import chat_prompts
from divmerge.lightning.resumable import ResumableTaskBatches


class MergeDataModule(L.LightningDataModule):
    """Unlabelled inputs of every task for merging; labelled inputs for evaluation.

    Each training batch holds ``batch_size_per_task`` inputs of every task (DivMerge samples 4 x T per
    step from the union of the tasks); shorter tasks cycle.

    Args:
        tasks: The tasks, one per expert. Keys of each entry (default in brackets): name [required: the
            expert's name]; source [none: one file, demo task or hub dataset, cut into test / val /
            unlabelled]; unlabelled, val, test [none: a split's own file, or a split name of a hub source;
            a split without one is cut from source]; text_column [text]; label_column [label];
            label_names [the expert's config.json id2label; else a list, or a .txt / .json file];
            num_unlabelled [256, or all of a smaller own file]; num_val [200, or all of a smaller own
            file]; num_test [all rows of an own test file, else 500; a source under 956 rows is cut
            52% / 21% / 27% into test / val / unlabelled]; hub_split [train]; hub_subset [none]; kind
            [classification, or generative]; prompt_template and answer_column [none: generative
            tasks]; chat_template [false: generative tasks]. Sizes divmerge chooses are printed. Each
            key in full: ``--data.tasks.help TaskSpec``.
        tokenizer: Tokenizer source; linked to ``model.base`` by train.py.
        max_length: Tokens per input: longer inputs are truncated (generative prompts on the left, so they
            keep the end their answer follows).
        batch_size_per_task: Unlabelled inputs of each task per training step and device (the global
            batch per task is this times the number of devices).
        eval_batch_size: Batch size for validation/test and for building the teacher cache.
        seed: Seed of the split shuffle and of the per-epoch training order.
        num_workers: DataLoader worker processes.
        experts: Linked to ``model.experts`` (and ``model.held_out``) by train.py: a task whose labels are
            strings and that sets no ``label_names`` takes its class names from its expert's config.json.

    """

    def __init__(
        self,
        tasks: list[TaskSpec],
        tokenizer: str = "zoo:minilm",
        max_length: int = 64,
        batch_size_per_task: int = 4,
        eval_batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        experts: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not tasks:
            raise DivMergeError("No tasks given: list them under data.tasks.")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise DivMergeError(f"Task names must be unique, got {names}.")
        for spec in tasks:
            check_task(spec)
        for name, value, low in (
            ("max_length", max_length, 1),
            ("batch_size_per_task", batch_size_per_task, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if value < low:
                raise DivMergeError(f"data.{name} is {value}: it must be at least {low}.")
        self.tasks = list(tasks)
        self.tokenizer_source = tokenizer
        self.max_length = max_length
        self.batch_size_per_task = batch_size_per_task
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.experts = dict(experts or {})
        self._datasets: dict[tuple[str, str], TaskDataset] = {}
        self._rows: dict[str, dict[str, Rows]] = {}

    @property
    def task_names(self) -> list[str]:
        """Task names in config order."""
        return [t.name for t in self.tasks]

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer (an expert's, when experts added tokens to the base's vocabulary)."""
        source = tokenizer_source(self.tokenizer_source, self.experts)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise DivMergeError(
                f"Could not load a tokenizer from {self.tokenizer_source!r} ({err})."
            ) from err
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # causal LMs often have none; padding is masked
        return tokenizer

    def rows(self, task: str) -> dict[str, Rows]:
        """The task's split rows (loaded and split once)."""
        if task not in self._rows:
            spec = self.tasks[self.task_names.index(task)]
            expert = self.experts.get(task)
            names = functools.partial(expert_class_names, expert) if expert else None
            self._rows[task] = load_splits(spec, self.seed, names)
        return self._rows[task]

    def label_names(self, task: str) -> tuple[str, ...] | None:
        """Class names of a task, if known."""
        return self.rows(task)["test"].label_names

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Training steps per epoch on ``world_size`` processes: the longest task's batches per process."""
        per_rank = (math.ceil(len(self.rows(t)["unlabelled"].texts) / world_size) for t in self.task_names)
        return max(math.ceil(n / self.batch_size_per_task) for n in per_rank)

    def dataset(self, task: str, split: Split) -> TaskDataset:
        """Tokenised dataset of one task split (built once)."""
        key = (task, split)
        if key not in self._datasets:
            part = self.rows(task)[split]
            self._datasets[key] = TaskDataset(self._encode(task, part.texts), part.labels)
        return self._datasets[key]

    def _encode(self, task: str, texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts``, at most ``max_length`` each; a generative prompt keeps its end."""
        if not texts:  # an empty split (num_val: 0): tokenizers fail on an empty list
            return []
        spec = self.tasks[self.task_names.index(task)]
        if spec.kind == "generative":
            if spec.chat_template:
                encoded = chat_prompts(self.tokenizer, task, texts)
            else:
                encoded = self.tokenizer(texts)["input_ids"]
            return [ids[-self.max_length :] for ids in encoded]
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def prepare_data(self) -> None:
        """Read every task once on rank 0 so bad data fails before any training starts."""
        for task in self.task_names:
            self.rows(task)

    def setup(self, stage: str) -> None:
        """Tokenise the splits this stage needs."""
        splits = {"fit": ("unlabelled", "val"), "validate": ("val",), "test": ("test",)}.get(stage, SPLITS)
        for task in self.task_names:
            for split in splits:
                self.dataset(task, split)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Pad a list of items into a batch."""
        return DataCollatorWithPadding(self.tokenizer, return_tensors="pt")(items)

    def eval_loader(self, task: str, split: Split) -> DataLoader:
        """Labelled (or, for teachers, unlabelled) loader of one task split, in dataset order."""
        return DataLoader(
            self.dataset(task, split),
            batch_size=self.eval_batch_size,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> CombinedLoader:
        """Per step: ``batch_size_per_task`` unlabelled inputs of every task, as {task: batch}.

        Resumable at any step (``divmerge.lightning.resumable``): a mid-epoch checkpoint continues with
        exactly the batches an uninterrupted run draws.
        """
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

        def resume_at() -> int:  # steps already done in this epoch: > 0 only when resuming mid-epoch
            if trainer is None or not trainer.fit_loop.restarting:
                return 0
            return trainer.fit_loop.epoch_loop.batch_progress.current.completed

        batches = ResumableTaskBatches(
            {task: self.dataset(task, "unlabelled") for task in self.task_names},
            self.batch_size_per_task,
            self.collate,
            world,
            rank,
            self.seed,
            resume_at,
            self.num_workers,
        )
        return CombinedLoader(batches, mode="max_size_cycle")  # one iterable: its steps are the epoch

    def eval_tasks(self, split: Split) -> list[str]:
        """Tasks with labelled examples in ``split``; position i is evaluation dataloader_idx i."""
        return [t for t in self.task_names if len(self.dataset(t, split))]

    def _scored_loader(self, task: str, split: Split) -> DataLoader:
        """A task split for scoring; on several processes each example goes to exactly one of them.

        Lightning's default distributed sampler pads a split that does not divide by the number of
        processes with repeated examples, which would be scored twice; this one does not repeat.
        """
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return self.eval_loader(task, split)
        ds = self.dataset(task, split)
        sampler = UnrepeatedDistributedSampler(ds, num_replicas=trainer.world_size, rank=trainer.global_rank)
        return DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> list[DataLoader]:
        """One labelled loader per task of ``eval_tasks("val")``."""
        return self._scored_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        """One labelled loader per task of ``eval_tasks("test")``."""
        return self._scored_loaders("test")

    def _scored_loaders(self, split: Split) -> list[DataLoader]:
        """Every task's scored loader of ``split``, refusing a split some process would get nothing of.

        Each example goes to one process, so with fewer examples than processes in every task a process
        gets none: Lightning then skips its evaluation hooks, and the others wait for it for ever.
        """
        tasks = self.eval_tasks(split)
        world = 1 if self.trainer is None else self.trainer.world_size
        largest = max((len(self.dataset(t, split)) for t in tasks), default=0)
        if tasks and largest < world:
            raise DivMergeError(
                f"The {split} split has at most {largest} examples per task, fewer than the {world} "
                f"processes, so some process would score none: give num_{split} >= {world}, or run "
                "fewer processes."
            )
        return [self._scored_loader(t, split) for t in tasks]
