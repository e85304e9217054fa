"""The command line: ``python train.py {fit,validate,test,export} [--config CONFIG] [--flags]``.

LightningCLI over ``DivMergeModule`` and ``MergeDataModule``. Without ``--config`` the built-in offline
demo (configs/demo4.yaml) runs: it builds four MiniLM experts on first use, learns layer-wise JS merge
coefficients and prints the per-task accuracy table.
"""

import contextlib
import logging
import math
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import transformers
from jsonargparse import ArgumentError, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from divmerge.disk import one_line as no_space_line
from divmerge.engine import check_trainable, check_writable_dir
from divmerge.errors import DivMergeError, first_line
from divmerge.lightning.checkpoint_io import SafeCheckpointIO, check_checkpoint, remove_stale_temporaries
from divmerge.lightning.datamodule import MergeDataModule
from divmerge.lightning.export_command import parse_export_args, run_export
from divmerge.lightning.lost_process import (
    LOST_PROCESS_EXIT,
    LostProcessError,
    lost_process,
    lost_process_line,
)
from divmerge.lightning.module import DivMergeModule
from divmerge.lightning.parse_errors import one_line
from divmerge.lightning.preemption import EXIT_BASE, Preemption
from divmerge.lightning.progress import PLAIN_EVERY_S, PlainProgress
from divmerge.lightning.run_dir import LOCK_FILE, guarded
from divmerge.lightning.strategy import MergeParallelStrategy
from divmerge.lightning.timing import PhaseTimer

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo4.yaml"
RUN_SUBCOMMANDS = ("fit", "validate", "test")
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
DEFAULT_EPOCHS = 4
"""Training length when the config sets none: 4 epochs (the demo: 4 x 64 steps) ..."""
MIN_DEFAULT_STEPS = 128
"""... and at least this many optimizer steps (small unlabelled sets get more epochs)."""


DESCRIPTION = (
    "divmerge: learn the coefficients that merge fine-tuned experts of one base model, without labels. "
    "Subcommands: fit, validate and test (below), and export (`python train.py export --help`: write the "
    "merged model as a Hugging Face directory, one LoRA adapter or one GGUF file)."
)


class DivMergeCLI(LightningCLI):
    """LightningCLI with the tokenizer tied to the base model and a test pass after fit."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's run subcommands without ``predict``: a merge has no forward of its own to call."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments("model.base", "data.tokenizer")
        parser.link_arguments(("model.experts", "model.held_out"), "data.experts", compute_fn=_all_experts)

    def parse_arguments(self, parser, args) -> None:
        """Parse, turning jsonargparse's usage dump and multi-line error into one DivMergeError line."""
        try:  # the parsers raise (make_cli: exit_on_error=False) instead of printing the usage and exiting
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise DivMergeError(one_line(str(err), sys.argv[1:] if args is None else args)) from None

    def _parse_ckpt_path(self) -> None:
        """Check an explicit --ckpt_path before anything runs or is written.

        LightningCLI would replace the configured model arguments with the checkpoint's; divmerge keeps
        the configured experts authoritative so that a checkpoint from another expert set is refused
        (by its fingerprint) instead of silently switching experts.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and str(ckpt_path) not in SPECIAL_CKPT_PATHS:
            check_checkpoint(ckpt_path)

    def _check_before_run(self) -> None:
        """Fail on mismatched tasks or a checkpoint of another expert set before any output is written."""
        self.model.check_data(self.datamodule)
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path == "best":  # Lightning's "best" is the best of a fit in this same process: never here
            dirs = [
                str(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)
            ]
            where = f" (in {dirs[0]!r})" if dirs else ""
            raise DivMergeError(
                "--ckpt_path best means the best checkpoint of a fit in this same process, which a separate "
                f"{self.subcommand} has not got: pass the checkpoint file{where}, or --ckpt_path last."
            )
        if ckpt_path == "last":
            dirs = [cb.dirpath for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
            found = [Path(d) / "last.ckpt" for d in dirs if (Path(d) / "last.ckpt").is_file()]
            ckpt_path = found[0] if found else None
        if ckpt_path and str(ckpt_path) not in SPECIAL_CKPT_PATHS:
            # sharded: the experts are loaded in shards at setup, and compared then (on_load_checkpoint)
            sharded = isinstance(self.trainer.strategy, ModelParallelStrategy)
            self.model.check_checkpoint_meta(check_checkpoint(ckpt_path), expert_set=not sharded)

    def before_fit(self) -> None:  # noqa: D102
        check_trainable(self.model.hparams.method)
        self.model.artefacts_after_test = True  # after_fit writes the figures once the table is out
        self._check_before_run()
        self._size_training()

    def _size_training(self) -> None:
        """Give training a length that fits the data when the config sets none; log at least once per epoch.

        Lightning's own default (1,000 epochs) is never what a merge wants.
        """
        trainer, dm = self.trainer, self.datamodule
        steps = dm.steps_per_epoch(trainer.world_size)
        config = self.config_init[self.subcommand]["trainer"]
        unset = config.get("max_epochs") is None and config.get("max_steps", -1) == -1
        if unset and not config.get("max_time"):
            epochs = max(DEFAULT_EPOCHS, math.ceil(MIN_DEFAULT_STEPS / steps))
            trainer.fit_loop.max_epochs = epochs
            rank_zero_notice(
                f"trainer.max_epochs is not set: training {epochs} epochs of {steps} steps ({epochs * steps} "
                "steps); set trainer.max_epochs or trainer.max_steps to choose."
            )
        trainer.log_every_n_steps = max(1, min(trainer.log_every_n_steps, steps))

    def before_validate(self) -> None:  # noqa: D102
        self._check_before_run()

    def before_test(self) -> None:  # noqa: D102
        self._check_before_run()

    def _set_seed(self) -> None:
        """Seed as LightningCLI does; a seed numpy cannot take is one line."""
        try:
            super()._set_seed()
        except (ValueError, TypeError) as err:
            raise DivMergeError(
                f"Invalid seed_everything: {first_line(err)}: give an integer >= 0."
            ) from None

    def instantiate_classes(self) -> None:
        """Build trainer, model and data; a value the classes cannot take is one line, not a traceback."""
        if not isinstance(self._get(self.config, "trainer", default={}) or {}, dict | Namespace):
            raise DivMergeError("trainer: must be a mapping of Trainer settings (see configs/demo4.yaml).")
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, AttributeError, KeyError, MisconfigurationException) as err:
            raise DivMergeError(
                f"Invalid config: {first_line(err)}: fix that value in the config or the flags (`python "
                "train.py fit --help` lists every key)."
            ) from err

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Build the Trainer with a phase timer; atomic checkpoint writes unless a CheckpointIO is set."""
        config = self._get(self.config_init, "trainer", default={}) or {}
        self._plain = not sys.stdout.isatty() and config.get("enable_progress_bar") is None
        if self._plain:  # a redrawn bar is useless in a file: plain lines instead (PlainProgress)
            kwargs.setdefault("enable_progress_bar", False)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as err:
            raise DivMergeError(
                f"Invalid trainer setting: {first_line(err)} Fix it under trainer: in the config."
            ) from err
        self.timer = PhaseTimer()
        trainer.callbacks.append(self.timer)
        trainer.callbacks.append(PlainProgress(every_s=PLAIN_EVERY_S if self._plain else math.inf))
        trainer.callbacks.append(Preemption())  # SIGTERM/SIGUSR1: last.ckpt at the step's end, exit 128+N
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        if type(trainer.strategy) is ModelParallelStrategy:  # read divmerge's full-file checkpoints
            trainer.strategy.__class__ = MergeParallelStrategy
        return trainer

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: object):
        """Default ``--verbose false`` for validate/test."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "verbose" in self._subcommand_method_arguments[subcommand]:
            parser.set_defaults(verbose=False)  # divmerge prints its own table; Lightning's truncates names
        return parser

    def _run_subcommand(self, subcommand: str) -> None:
        """Run with the checkpoint directory locked (fit), removing what a bad-input failure created."""
        dirs = [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        outputs = [*dirs, *([Path(self.trainer.log_dir)] if self.trainer.log_dir else [])]
        rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
        lock_dir = (dirs[0] if dirs else None) if subcommand == "fit" and rank0 else None
        for path in outputs:
            check_writable_dir(path, "The run's log or checkpoint directory")
        try:
            with guarded(outputs if rank0 else [], lock_dir), warnings.catch_warnings():
                if lock_dir is not None:
                    remove_stale_temporaries(lock_dir)  # a killed run's half-written checkpoint
                    if not _holds_more_than(lock_dir, LOCK_FILE):  # Lightning would warn about our lock
                        not_empty = f"Checkpoint directory {re.escape(str(lock_dir))} exists and is not empty"
                        warnings.filterwarnings("ignore", message=not_empty)
                with _past_max_epochs_explained():
                    super()._run_subcommand(subcommand)
        except Exception as err:  # a collective that lost a process: one line, not a traceback per rank
            if not lost_process(err):
                raise
            kill = getattr(self.trainer.strategy.launcher, "kill", None)  # the ranks Lightning started here
            if kill is not None:  # (a stuck one would hold the run open)
                kill(signal.SIGKILL)
            raise LostProcessError(
                lost_process_line(err, self.timer.current(), self.trainer, subcommand)
            ) from None

    def after_fit(self) -> None:
        """Report the learned merge on the test split (per-task table + ANP)."""
        if not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self.model.write_fit_artefacts()  # optional figures after the table: a full disk cannot lose it
        self._print_phases()

    def after_validate(self) -> None:  # noqa: D102
        self._print_phases()

    def after_test(self) -> None:  # noqa: D102
        self._print_phases()

    def _print_phases(self) -> None:
        if self.trainer.is_global_zero:
            title = "Wall time per phase (this machine, as loaded during the run)"
            print(f"{title}:\n{self.timer.table()}\n", flush=True)


@contextlib.contextmanager
def _past_max_epochs_explained() -> Iterator[None]:
    """Lightning's MisconfigurationException for a resume beyond ``max_epochs``, as one DivMergeError line."""
    try:
        yield
    except MisconfigurationException as err:
        done = re.search(r"current_epoch=(\d+).*max_epochs=(-?\d+)", str(err))
        if done is None:
            raise
        raise DivMergeError(
            f"The checkpoint is at epoch {done[1]} (counted from 0), past trainer.max_epochs {done[2]}: "
            "raise trainer.max_epochs to train further, or test or export the checkpoint as it is."
        ) from None


def _holds_more_than(directory: Path, name: str) -> bool:
    """Whether ``directory`` exists and holds an entry other than ``name``."""
    return directory.is_dir() and any(entry.name != name for entry in directory.iterdir())


def _all_experts(experts: dict[str, str], held_out: dict[str, str] | None) -> dict[str, str]:
    return {**experts, **(held_out or {})}


def with_default_config(argv: list[str]) -> list[str]:
    """Add the demo config to a run subcommand given without ``--config``."""
    if (
        argv
        and argv[0] in RUN_SUBCOMMANDS
        and not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)
    ):
        print(f"divmerge: no --config given, running the built-in demo ({DEMO_CONFIG.name})", file=sys.stderr)
        return [argv[0], "--config", str(DEMO_CONFIG), *argv[1:]]
    return argv


@rank_zero_only
def rank_zero_notice(message: str) -> None:
    """One ``divmerge: ...`` line on stderr, from the first process only."""
    print(f"divmerge: {message}", file=sys.stderr, flush=True)


class _DropTips(logging.Filter):
    """Drop Lightning's advertising lines (litlogger / litmodels tips), which read like a missing setup."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a tip."""
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


def quiet_libraries() -> None:
    """Remove library noise that is not about the user's run (kept: Lightning's and divmerge's own lines)."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    # Lightning's CombinedLoader still calls a torch._pytree API that torch 2.13 deprecates.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # num_val: 0 on every task gives an empty validation loader on purpose.
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    notices = logging.getLogger("divmerge")  # data sizes, class names: "divmerge: ..." lines on stderr
    if not notices.handlers and rank_zero_only.rank == 0:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("divmerge: %(message)s"))
        notices.addHandler(handler)
        notices.setLevel(logging.INFO)


@contextlib.contextmanager
def _argv(args: list[str]) -> Iterator[None]:
    """Present ``args`` as the command line (LightningCLI warns when given both ``args`` and sys.argv)."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "train.py", *args]
    try:
        yield
    finally:
        sys.argv = saved


def make_cli(args: list[str], run: bool = True) -> DivMergeCLI:
    """Instantiate the LightningCLI (and run its subcommand when ``run``)."""
    with _argv(args):
        return DivMergeCLI(
            DivMergeModule,
            MergeDataModule,
            run=run,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "description": DESCRIPTION},  # errors: parse_arguments
            seed_everything_default=0,
            # The coefficients exist only after setup(): the module builds its own optimizer (model.lr,
            # model.lr_schedule) instead of LightningCLI's --optimizer, which would see no parameters.
            auto_configure_optimizers=False,
        )


def main(argv: list[str] | None = None) -> DivMergeCLI | Path:
    """Run the CLI; bad input ends with one line on stderr and exit code 2."""
    quiet_libraries()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "export":
            options, overrides = parse_export_args(args[1:], DEMO_CONFIG)
            return run_export(options, lambda cli_args: make_cli(cli_args, run=False).model, overrides)
        return make_cli(with_default_config(args))
    except DivMergeError as err:
        print(f"divmerge: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except LostProcessError as err:
        print(f"divmerge: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(LOST_PROCESS_EXIT) from None
    except Exception as err:  # a full disk met by a library (e.g. the logger, while handling our own error)
        if (line := no_space_line(err)) is None:
            raise
        print(f"divmerge: error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    except SIGTERMException:  # Lightning's: SIGTERM outside training steps (validation, test, sanity check)
        print("divmerge: stopped by SIGTERM before it finished: rerun the same command.", file=sys.stderr)
        raise SystemExit(EXIT_BASE + signal.SIGTERM) from None
