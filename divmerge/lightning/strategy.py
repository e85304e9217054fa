"""``ModelParallelStrategy`` reading divmerge's checkpoints: full files, through the safe loader.

Lightning's ``ModelParallelStrategy.load_checkpoint`` restores a model whose parameters are DTensors
(FSDP2 / tensor parallel) with torch's distributed checkpoint reader, and refuses a module without
any. divmerge shards its frozen base and task vectors itself; its only parameters, the coefficients,
are replicated, and its checkpoints are single kilobyte files (``save_distributed_checkpoint: false``,
required). So resuming, validating or testing from ``--ckpt_path`` under that strategy reads the file
on every rank through the trainer's ``CheckpointIO`` (``SafeCheckpointIO``: data only, one-line
errors) and restores the module and optimizer as a single-device strategy does.
"""

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy, Strategy


class MergeParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose checkpoint loading is the plain, full-file one (module docstring).

    The CLI gives a configured ``ModelParallelStrategy`` this class (it adds no state), so configs name
    Lightning's strategy.
    """

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint file rank 0 names, read on every rank by the trainer's ``CheckpointIO``.

        Always as data (``weights_only=True``), whatever ``CheckpointIO`` the trainer has.
        """
        path = self.broadcast(checkpoint_path)  # "last" may resolve differently per rank
        return Strategy.load_checkpoint(self, path, weights_only=True)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """The module's state (the coefficients), as on one device."""
        Strategy.load_model_state_dict(self, checkpoint, strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """The optimizers' states (saved full, keyed by parameter id), as on one device."""
        Strategy.load_optimizer_state_dict(self, checkpoint)

    @property
    def lightning_restore_optimizer(self) -> bool:
        """Lightning restores the optimizers and schedulers from the loaded checkpoint."""
        return True
