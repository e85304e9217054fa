"""The command line: ``python train.py {fit,validate,test,export} [--config CONFIG] [--flags]``.

LightningCLI over ``DivMergeModule`` and ``MergeDataModule``. Without ``--config`` the built-in offline
demo (configs/demo4.yaml) runs: it builds four MiniLM experts on first use, learns layer-wise JS merge
coefficients and prints the per-task accuracy table.
"""

import os
import sys
from pathlib import Path

import transformers
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from divmerge.engine import check_trainable, check_writable_dir
from divmerge.errors import DivMergeError, first_line
from divmerge.lightning.checkpoint_io import SafeCheckpointIO, check_checkpoint
from divmerge.lightning.datamodule import MergeDataModule
from divmerge.lightning.export_command import parse_export_args, run_export
from divmerge.lightning.module import DivMergeModule
from divmerge.lightning.run_dir import guarded
from divmerge.lightning.timing import PhaseTimer

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo4.yaml"
RUN_SUBCOMMANDS = ("fit", "validate", "test")
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


class DivMergeCLI(LightningCLI):
    """LightningCLI with the tokenizer tied to the base model and a test pass after fit."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments("model.base", "data.tokenizer")

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
        if ckpt_path == "last":
            dirs = [cb.dirpath for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
            found = [Path(d) / "last.ckpt" for d in dirs if (Path(d) / "last.ckpt").is_file()]
            ckpt_path = found[0] if found else None
        if ckpt_path and str(ckpt_path) not in SPECIAL_CKPT_PATHS:
            self.model.check_checkpoint_meta(check_checkpoint(ckpt_path))

    def before_fit(self) -> None:  # noqa: D102
        check_trainable(self.model.hparams.method)
        self._check_before_run()

    def before_validate(self) -> None:  # noqa: D102
        self._check_before_run()

    def before_test(self) -> None:  # noqa: D102
        self._check_before_run()

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Build the Trainer with a phase timer; atomic checkpoint writes unless a CheckpointIO is set."""
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as err:
            raise DivMergeError(
                f"Invalid trainer setting: {first_line(err)} Fix it under trainer: in the config."
            ) from err
        self.timer = PhaseTimer()
        trainer.callbacks.append(self.timer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Run with the checkpoint directory locked (fit), removing what a bad-input failure created."""
        dirs = [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        outputs = [*dirs, *([Path(self.trainer.log_dir)] if self.trainer.log_dir else [])]
        rank0 = int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
        lock_dir = (dirs[0] if dirs else None) if subcommand == "fit" and rank0 else None
        for path in outputs:
            check_writable_dir(path, "The run's log or checkpoint directory")
        with guarded(outputs if rank0 else [], lock_dir):
            super()._run_subcommand(subcommand)

    def after_fit(self) -> None:
        """Report the learned merge on the test split (per-task table + ANP)."""
        if not self.trainer.interrupted:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self._print_phases()

    def after_validate(self) -> None:  # noqa: D102
        self._print_phases()

    def after_test(self) -> None:  # noqa: D102
        self._print_phases()

    def _print_phases(self) -> None:
        if self.trainer.is_global_zero:
            print(f"Wall time per phase:\n{self.timer.table()}\n", flush=True)


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


def make_cli(args: list[str], run: bool = True) -> DivMergeCLI:
    """Instantiate the LightningCLI (and run its subcommand when ``run``)."""
    return DivMergeCLI(
        DivMergeModule,
        MergeDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        # The coefficients exist only after setup(): the module builds its own optimizer (model.lr,
        # model.lr_schedule) instead of LightningCLI's --optimizer, which would see no parameters.
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> DivMergeCLI | Path:
    """Run the CLI; bad input ends with one line on stderr and exit code 2."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] == "export":
            options, overrides = parse_export_args(args[1:], DEMO_CONFIG)
            return run_export(options, lambda cli_args: make_cli(cli_args, run=False).model, overrides)
        return make_cli(with_default_config(args))
    except DivMergeError as err:
        print(f"divmerge: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
