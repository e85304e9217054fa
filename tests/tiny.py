"""Tiny random models and data for fast tests: a 2-layer BERT base, perturbed experts, small CSVs."""

import os
import random
import shutil
import signal
from pathlib import Path

import pandas as pd
import torch
from lightning.pytorch import Callback
from transformers import BertConfig, BertForSequenceClassification, BertModel

from divmerge.zoo import base_model_path

WORDS = [
    "good",
    "bad",
    "great",
    "awful",
    "movie",
    "film",
    "plot",
    "actor",
    "news",
    "sport",
    "money",
    "vote",
    "phone",
    "free",
    "win",
    "call",
    "what",
    "who",
    "where",
]


def cpu_trainer(run: Path, epochs: int, checkpoints: bool = False) -> dict:
    """The ``trainer`` section of a test config: one CPU device, quiet, CSV logs under ``run``.

    Args:
        run: Log directory; checkpoints go to ``run / "ckpt"``.
        epochs: ``max_epochs``.
        checkpoints: Add a ModelCheckpoint that keeps ``last.ckpt``.

    """
    trainer: dict = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "logger": {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(run), "name": "t"},
        },
    }
    if checkpoints:
        trainer["callbacks"] = [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(run / "ckpt"), "save_last": True},
            }
        ]
    return trainer


def tiny_config() -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )


def copy_tokenizer(dest: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        src = base_model_path() / name
        if src.exists():
            shutil.copy(src, dest / name)


def make_base(path: Path, seed: int = 0, config: BertConfig | None = None) -> Path:
    torch.manual_seed(seed)
    model = BertModel(config or tiny_config())
    model.save_pretrained(path)
    copy_tokenizer(path)
    return path


def make_expert(base: Path, path: Path, num_labels: int, seed: int, scale: float = 0.05) -> Path:
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(path)
    copy_tokenizer(path)
    return path


def make_csv(path: Path, rows: int, num_labels: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(rows)]
    labels = [rng.randrange(num_labels) for _ in range(rows)]
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return path


def make_setup(root: Path, tasks: dict[str, int] | None = None, rows: int = 60) -> dict:
    """Base, experts and data files for `tasks` (name -> number of classes)."""
    tasks = tasks or {"alpha": 2, "beta": 3}
    base = make_base(root / "base")
    experts, data = {}, {}
    for i, (name, k) in enumerate(tasks.items()):
        experts[name] = str(make_expert(base, root / f"expert_{name}", k, seed=i + 1))
        data[name] = str(make_csv(root / f"{name}.csv", rows, k, seed=i))
    return {"base": str(base), "experts": experts, "data": data, "cache": str(root / "cache")}


class StopAfterEpochs(Callback):
    """Simulates an interrupted run: stop training after `epochs` epochs (checkpoints are written)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class SimulatedKillError(RuntimeError):
    """Raised by CrashAtStep: the process 'dies' after a training step, before that step's checkpoint."""


class CrashAtStep(Callback):
    """Simulates kill -9 right after optimizer step ``step`` (checkpoint callbacks run after this one)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SimulatedKillError(f"killed after step {self.step}")


class MetricsProbe(Callback):
    """Records, at each training epoch's end, how many data rows the CSV logger's metrics.csv holds."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        path = Path(trainer.logger.log_dir) / "metrics.csv"
        self.rows.append(len(path.read_text().splitlines()) - 1 if path.is_file() else 0)


def random_batches() -> tuple[dict, dict]:
    """Two tasks' random batches and teacher log-probs for the tiny setup's 2- and 3-class experts.

    Returns ({task: batch of 3 x 6 or 2 x 8 tokens, one row padded}, {task: (B_t, C_t) log-probs}).
    """
    g = torch.Generator().manual_seed(3)
    batches = {
        0: {"input_ids": torch.randint(1000, 2000, (3, 6), generator=g), "attention_mask": torch.ones(3, 6)},
        1: {"input_ids": torch.randint(1000, 2000, (2, 8), generator=g), "attention_mask": torch.ones(2, 8)},
    }
    batches[1]["attention_mask"][0, 5:] = 0
    teachers = {0: torch.log_softmax(torch.randn(3, 2, generator=g), -1)}
    teachers[1] = torch.log_softmax(torch.randn(2, 3, generator=g), -1)
    return batches, teachers


def randomise_coefficients(merged) -> None:
    """Seeded uniform(-0.5, 1) coefficients, so that no merge is a plain average."""
    with torch.no_grad():
        merged.coefficients.weight.uniform_(-0.5, 1.0, generator=torch.Generator().manual_seed(4))


class KillAt(Callback):
    """``kill -9`` this process at one point of a run, on one rank (for the dead-rank tests).

    Args:
        rank: The global rank that dies.
        hook: ``setup`` (as the teacher cache starts), ``train_step``, ``validation``, ``save`` (while a
            checkpoint is being written), or ``stop``: ``kill -STOP`` (alive but stuck) at a training step.
        epoch: The epoch at which ``train_step``, ``validation`` or ``save`` kills.
    """

    def __init__(self, rank: int, hook: str, epoch: int = 1) -> None:
        self.rank, self.hook, self.epoch = rank, hook, epoch

    def _maybe_kill(self, trainer, hook: str) -> None:
        at = hook == "setup" or trainer.current_epoch == self.epoch
        if hook == self.hook and trainer.global_rank == self.rank and at:
            os.kill(os.getpid(), signal.SIGKILL)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._maybe_kill(trainer, "setup")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_kill(trainer, "train_step")
        if self.hook == "stop" and trainer.global_rank == self.rank and trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGSTOP)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._maybe_kill(trainer, "validation")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._maybe_kill(trainer, "save")
