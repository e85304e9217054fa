"""The LightningModule: thin hooks that call the merge engine (``divmerge.engine.Merger``).

training_step = sum over tasks t of mean_{x in batch_t} D(expert_t(.|x) || merged(.|x))
(DivMerge, arXiv 2509.02108), with expert outputs read from the teacher cache.
"""

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from divmerge.core.coefficients import Granularity
from divmerge.core.merged_model import MergedModel, MergeModeOption
from divmerge.disk import write_atomic
from divmerge.engine import DEFAULT_LR, LEARNED, Merger, TaskVectorDtype, check_method, check_trainable
from divmerge.errors import DivMergeError, RunStoppedError
from divmerge.evaluation import TaskResult, anp, format_table, write_report
from divmerge.experts.sources import resolve_source
from divmerge.families.base import ROWS
from divmerge.families.causal_lm import GenerationMetric
from divmerge.families.classification import BackbonePass
from divmerge.lightning import checkpoint_io, nonfinite
from divmerge.lightning.datamodule import MergeDataModule
from divmerge.phases import TEACHER_PHASE, timed
from divmerge.plots import FIX as PLOT_FIX
from divmerge.plots import plot_coefficients, plot_divergence

_STAGE_SPLITS = {"fit": ("unlabelled", "val"), "validate": ("val",), "test": ("test",)}


class DivMergeModule(L.LightningModule):
    """Learned model merging: the merge coefficients are the only trainable tensors.

    Args:
        experts: Task name -> expert source (local HF directory, hub id, or ``zoo:<task>`` for a demo
            expert). Task names must match ``data.tasks``.
        base: Source of the pretrained base model the experts were fine-tuned from.
        granularity: ``task`` (one coefficient per task), ``layer`` (one per task per parameter tensor),
            ``block`` (one per task per transformer block), ``row`` (one per task per output row of each
            weight matrix) or ``svd`` (one per task per singular direction of each matrix task vector,
            stored at rank ``space_options.rank``): the coefficient spaces of
            ``divmerge.core.coefficients.SPACES``. ``row`` and ``svd`` need fully fine-tuned experts and
            a data-parallel strategy.
        space_options: Options of the coefficient space: ``{rank: r}`` for ``svd`` (singular directions
            kept per task and matrix; unset keeps all).
        objective: ``js`` (Jensen-Shannon, DivMerge), ``kl`` (KL(expert || merged)) or ``entropy``
            (AdaMerging).
        init: Initial coefficient value; None means 1/T (0 with ``start_from``).
        start_from: A static method (as ``method``) whose merge the learned coefficients start from: the
            merge is theta_s + sum_t c_t tau_t around that static merge theta_s, with c starting at 0,
            so training starts from the static merge and corrects it. None merges around the base.
        start_options: Options of ``start_from`` (e.g. ``{rank_fraction: 0.5}`` for tsv_m).
        clamp: Optional (low, high) bounds for the coefficients; None leaves them unconstrained.
        lr: Adam learning rate for the coefficients (0.05, the benchmark's best at 6 tasks).
        lr_schedule: ``cosine`` decays the learning rate to 0 over the run's total steps (max_epochs /
            max_steps); ``constant`` keeps it.
        method: ``divmerge`` learns the coefficients (with ``objective`` and ``granularity``); the name
            of a static merge (``average``, ``task_arithmetic``, ``ties``, ``dare``, ``tsv_m``,
            ``iso_c``, ``iso_cts``, ``wudi``) merges without training and is evaluated by ``validate`` /
            ``test`` on the same code.
        method_options: Options of a static ``method`` (e.g. ``{lambda_: 1.0, density: 0.2}`` for ties).
        reference: Static merge reported beside the learned one by validate/test ("reference" column).
        reference_options: Options of the reference merge (e.g. ``{lambda_: 0.3}``).
        task_vector_dtype: Storage dtype of the task vectors: ``float32``, or ``bfloat16`` / ``float16`` to
            halve their memory (coefficients and the merge arithmetic stay float32).
        backbone_pass: ``per_task`` (default) runs each task's forward+backward in turn and accumulates
            the merged tensors' gradients: activations of one task's batch at a time, so memory grows by
            one task vector per expert. ``joint`` runs every task in one concatenated pass: larger
            matmuls, and with ``merge_mode: per_block`` each block merged (and, sharded, gathered)
            once per step instead of once per task, but activation memory grows with the number of
            tasks (only each block's input, per block).
        merge_mode: ``whole`` merges every tensor before a training step's forward and keeps the merged
            model and its gradient until backward; ``per_block`` merges each transformer block's tensors
            just before it runs and recomputes them with the block in backward, so only one block's
            merged tensors and gradient exist at a time (and only each block's input is kept: activation
            checkpointing), for about one more forward of compute: for experts too large for two more
            model copies, or long prompts. ``auto`` (default) picks ``per_block`` under
            ModelParallelStrategy or when the merged model and its gradient (8 bytes per parameter) would
            take over a quarter of the device's memory, else ``whole``. Evaluation (teachers,
            generation, scores) follows the mode, sharded or not (with ``start_from``, the experts'
            one-hot merges are whole).
        held_out: Held-out tasks (arXiv 2410.03617): task name -> a classifier whose head scores that task
            on the merged backbone; it is not merged, and is normalised against the base backbone with
            the same head. Its data needs labelled val/test examples only.
        cache_dir: Where teacher outputs (and demo experts) are cached; None means $DIVMERGE_CACHE or
            ~/.cache/divmerge.
        max_new_tokens: Causal-LM experts: most tokens generated per answer, by each expert (teacher
            cache) and by the merged model (evaluation); generation also stops at EOS.
        teacher_top_k: Causal-LM experts: cache each answer position's distribution as the expert's top-k
            probabilities plus the remaining mass, and compute the divergence over those k + 1 outcomes
            for expert and merged model alike; None caches and compares full-vocabulary distributions.
        generation_metric: Causal-LM experts: how generated answers are scored against the reference
            (``exact_match``, whitespace stripped, or a torchmetrics.text metric), for every task or as
            a mapping task -> metric (e.g. ``{bbc_headline: CHRFScore}``; tasks not named use
            ``exact_match``); ANP divides the merged model's score by the expert's.

    """

    def __init__(
        self,
        experts: dict[str, str],
        base: str = "zoo:minilm",
        granularity: Granularity = "layer",
        space_options: dict[str, int] | None = None,
        objective: str = "js",
        init: float | None = None,
        start_from: str | None = None,
        start_options: dict[str, float | int | str] | None = None,
        clamp: tuple[float, float] | None = None,
        lr: float = DEFAULT_LR,
        lr_schedule: Literal["constant", "cosine"] = "cosine",
        method: str = "divmerge",
        method_options: dict[str, float | int | str] | None = None,
        reference: str = "task_arithmetic",
        reference_options: dict[str, float | int | str] | None = None,
        task_vector_dtype: TaskVectorDtype = "float32",
        backbone_pass: BackbonePass = "per_task",
        merge_mode: MergeModeOption = "auto",
        held_out: dict[str, str] | None = None,
        cache_dir: str | None = None,
        max_new_tokens: int = 16,
        teacher_top_k: int | None = None,
        generation_metric: GenerationMetric | dict[str, GenerationMetric] = "exact_match",
    ) -> None:
        super().__init__()
        if not experts:
            raise DivMergeError("No experts given: list them under model.experts as `task_name: path`.")
        if max_new_tokens < 1 or (teacher_top_k is not None and teacher_top_k < 1):
            raise DivMergeError(
                f"max_new_tokens ({max_new_tokens}) and teacher_top_k ({teacher_top_k}) must be at least 1 "
                "(leave teacher_top_k unset for full distributions)."
            )
        if not (math.isfinite(lr) and lr > 0):
            raise DivMergeError(
                f"model.lr is {lr}: the learning rate must be a positive number, e.g. {DEFAULT_LR}."
            )
        self.engine = Merger(
            base,
            experts,
            held_out,
            granularity,
            objective,
            init,
            clamp,
            task_vector_dtype,
            backbone_pass,
            {
                "max_new_tokens": max_new_tokens,
                "teacher_top_k": teacher_top_k,
                "generation_metric": generation_metric,
            },
            cache_dir,
            space_options=space_options,
            start_from=start_from,
            start_options=start_options,
            merge_mode=merge_mode,
        )
        check_method(method, method_options or {})
        if start_from is not None and method != LEARNED:
            raise DivMergeError(
                f"model.start_from applies to learned merges, and model.method is the static {method!r}: "
                "remove start_from, or set method: divmerge."
            )
        check_method(reference, reference_options or {}, learned_ok=False)
        self.save_hyperparameters()
        self.cache_dir = self.engine.cache_dir
        self.merged: MergedModel | None = None
        self.metrics = nn.ModuleDict()
        self._eval_params: dict[str, dict[str, Tensor]] = {}
        self._val_divergence: dict[str, list[float]] = {}  # task -> [sum over inputs, count]
        self.last_results: list[TaskResult] = []
        self._storage_reported = False

    # ---------------------------------------------------------------- building
    @property
    def task_names(self) -> list[str]:
        """Task (expert) names in order."""
        return self.engine.task_names

    @property
    def held_out(self) -> list[str]:
        """Held-out task names (evaluated, not merged)."""
        return self.engine.held_out

    @property
    def all_tasks(self) -> list[str]:
        """Merged tasks then held-out tasks: the index order of heads in the merged model."""
        return self.engine.all_tasks

    @property
    def fingerprint(self) -> str | None:
        """Hash of the expert set (recorded in checkpoints)."""
        return self.engine.fingerprint

    def prepare_data(self) -> None:
        """Rank 0: fetch or build (demo) experts so every rank can load them in setup."""
        for source in self.engine.sources():
            resolve_source(source, build=True)

    def build(self, mesh: DeviceMesh | None = None, device: torch.device | None = None) -> MergedModel:
        """Load base and experts and create the coefficients (once); registered as ``self.merged``.

        Args:
            mesh: Ranks to shard the base and task vectors over (``Merger.build``); None keeps them whole.
            device: The training device, whose memory ``merge_mode: auto`` weighs.
        """
        if self.merged is None or mesh is not None or device is not None:
            first = self.merged is None
            self.merged = self.engine.build(mesh, device)
            if first:
                self.metrics = self.engine.new_metrics()
        return self.merged

    def check_data(self, dm: object) -> MergeDataModule:
        """Check that ``dm`` is a MergeDataModule with exactly one task per expert."""
        if not isinstance(dm, MergeDataModule):
            raise DivMergeError("DivMergeModule needs a MergeDataModule: pass data= / --data to the trainer.")
        self.engine.check_task_names(dm.task_names)
        return dm

    def check_checkpoint_meta(self, meta: dict[str, Any], expert_set: bool = True) -> None:
        """Refuse checkpoint metadata (``checkpoint["divmerge"]``) made with a different expert set.

        Args:
            meta: The checkpoint's ``divmerge`` entry.
            expert_set: Also compare what needs the experts loaded (the fingerprint, the tensor names):
                not before a sharded run's setup, which would load them whole on every rank; its
                ``on_load_checkpoint`` compares them once they are loaded in shards.
        """
        lacking = [key for key in ("fingerprint", "tasks", "granularity") if key not in meta]
        if lacking:
            raise DivMergeError(
                f"The checkpoint's divmerge entry lacks {lacking} (edited or damaged): pass an intact .ckpt "
                "written by divmerge, or start a fresh run without --ckpt_path."
            )
        theirs, ours = meta.get("granularity"), self.hparams.granularity
        if expert_set:
            self.build()
            if meta["fingerprint"] != self.fingerprint:
                raise DivMergeError(
                    f"The checkpoint was made with another expert set (tasks {meta['tasks']}, fingerprint "
                    f"{meta['fingerprint']}) than the configured one (tasks {self.task_names}, fingerprint "
                    f"{self.fingerprint}): resume with the experts it was made with, or start a fresh run "
                    "without --ckpt_path."
                )
        options = self.hparams.space_options or {}
        if theirs == ours and meta.get("space_options", {}) != options:
            raise DivMergeError(
                f"The checkpoint's {theirs} coefficients have space_options {meta.get('space_options', {})} "
                f"but the config asks for {options}: set model.space_options to match, or start a fresh "
                "run without --ckpt_path."
            )
        start = {"from": self.hparams.start_from, "options": dict(self.hparams.start_options or {})}
        if meta.get("start", {"from": None, "options": {}}) != start:
            raise DivMergeError(
                f"The checkpoint's coefficients start from {meta.get('start')} but the config asks for "
                f"{start}: set model.start_from / start_options to match, or start a fresh run without "
                "--ckpt_path."
            )
        if theirs != ours or (expert_set and meta.get("tensor_names") != self.build().names):
            raise DivMergeError(
                f"The checkpoint holds {theirs}-wise coefficients but the config asks for {ours}-wise ones: "
                f"set model.granularity: {theirs} to use it, or start a fresh run without --ckpt_path."
            )

    def _datamodule(self) -> MergeDataModule:
        return self.check_data(getattr(self.trainer, "datamodule", None))

    def setup(self, stage: str) -> None:
        """Load experts, check the data against them, and fill the teacher cache for this stage.

        Under ``ModelParallelStrategy`` every rank reads only its share of the experts (sharded loading,
        ``divmerge.experts.sharded_loading``) and the teacher cache is built by all ranks together, each
        decoding its share of the inputs (``Merger.build_teachers``); otherwise rank 0 builds it.
        """
        mesh = self.sharding_mesh()
        merged = self.build(mesh, self.trainer.strategy.root_device)
        rank_zero_info(f"merge_mode: {merged.merge_mode} ({self.engine.merge_mode_reason})")
        dm = self._datamodule()
        self.engine.check_data(dm)
        splits = _STAGE_SPLITS.get(stage, ("unlabelled", "val", "test"))
        if mesh is not None or self.engine.holds_two_copies:
            # once sharded, a merge is a collective: no rank-0-only teachers later; a space that stores
            # its own form of the task vectors (svd) releases the dense ones after its teachers
            splits = ("unlabelled", "val", "test")
        paths = self.engine.teacher_paths(dm, splits)
        with timed(TEACHER_PHASE):  # reported in the phase table (divmerge.lightning.timing)
            device = self.trainer.strategy.root_device
            if mesh is not None or self.trainer.is_global_zero:
                merged.to(device)
                for task, split, path in self.engine.build_teachers(dm, paths, device, mesh):
                    rank_zero_info(f"teacher cache: built {task}/{split} -> {path}")
            self.trainer.strategy.barrier("divmerge_teacher_cache")
        self.engine.load_teachers(dm, paths)
        self.engine.release_expert_set()

    @property
    def shards_task_vectors(self) -> bool:
        """Whether the strategy is Lightning's ``ModelParallelStrategy`` (task vectors get sharded)."""
        trainer = self._trainer
        return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)

    def sharding_mesh(self) -> DeviceMesh | None:
        """Under ``ModelParallelStrategy``, the data-parallel mesh the base and task vectors are sharded over.

        Each of the N data-parallel ranks keeps 1/N of the base and of every stacked task vector
        (``divmerge.core.sharding``): for expert sets whose T task vectors do not fit one device. Use
        ``tensor_parallel_size: 1`` (the ranks are data parallel) and ``save_distributed_checkpoint:
        false`` (one small coefficient file).

        Returns:
            The mesh, or None under any other strategy.
        """
        if not self.shards_task_vectors:
            return None
        if self.device_mesh["tensor_parallel"].size() != 1:
            raise DivMergeError(
                "divmerge shards task vectors over the data-parallel ranks: set the strategy's "
                "tensor_parallel_size: 1 (and data_parallel_size to the number of processes)."
            )
        if self.is_static:
            raise DivMergeError(
                f"Static merge {self.hparams.method!r} needs every task vector whole: run it without "
                "ModelParallelStrategy (e.g. strategy: ddp or one device)."
            )
        if getattr(self.trainer.strategy, "_save_distributed_checkpoint", False):
            raise DivMergeError(
                "Set ModelParallelStrategy's save_distributed_checkpoint: false: divmerge checkpoints "
                "hold only the coefficients, written as one small file."
            )
        return self.device_mesh["data_parallel"]

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``, say how much of the base and task vectors this rank keeps.

        The sharding itself happens in ``setup`` (sharded loading), before the teachers are built.
        """
        if self.merged is None or not self.merged.sharded or self._storage_reported:
            return
        self._storage_reported = True
        local, total = self.merged.stored_bytes()
        print(
            f"divmerge: rank {self.global_rank} keeps {local / 1e6:.2f} of {total / 1e6:.2f} MB of the base "
            "and task vectors",
            flush=True,
        )

    # ---------------------------------------------------------------- training
    def configure_optimizers(self) -> Any:
        """Adam over the coefficients alone, with the configured learning-rate schedule."""
        optimizer = torch.optim.Adam(self.build().coefficients.parameters(), lr=self.hparams.lr)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: dict[str, dict[str, Tensor]], batch_idx: int) -> Tensor:
        """Sum over tasks of the mean divergence between expert (cached) and merged outputs."""
        loss, per_task = self.engine.step_loss(batch)
        nonfinite.check_step_loss(self, loss, per_task)  # NaN / inf: stop before backward and the step
        for task, value in per_task.items():
            size = len(batch[task]["idx"])
            self.log(f"train/{self.hparams.objective}/{task}", value, batch_size=size)
        sizes = sum(len(batch[task]["idx"]) for task in per_task)
        self.log("train/loss", loss, prog_bar=True, batch_size=sizes)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Take the optimizer step; stop the run if it left a coefficient NaN or inf (before any save)."""
        super().optimizer_step(*args, **kwargs)
        nonfinite.check_coefficients_after_step(self, self.build().coefficients.weight, self.task_names)

    # ---------------------------------------------------------------- evaluation
    @property
    def is_static(self) -> bool:
        """Whether ``method`` is a static merge (no training)."""
        return self.hparams.method != LEARNED

    def eval_params(self, whole: bool = True) -> dict[str, Tensor]:
        """The merged tensors this module evaluates: learned coefficients or the static merge.

        Args:
            whole: Every tensor merged (export); False: a learned merge in the model's merge mode (per
                block in the per-block mode: no whole merged model while evaluating).
        """
        self.build()
        return self.engine.params(self.hparams.method, self.hparams.method_options, whole)

    def reference_params(self) -> dict[str, Tensor] | None:
        """The reference column's merged tensors (None where sharded task vectors cannot give them)."""
        self.build()
        params = self.engine.reference_params(self.hparams.reference, self.hparams.reference_options)
        if params is None:
            rank_zero_info(
                f"reference {self.hparams.reference!r} needs whole task vectors: not computed with sharding."
            )
        return params

    def _eval_start(self) -> None:
        if not self.is_static:  # no ANP for a non-finite merge
            nonfinite.refuse_nonfinite_merge(self.build().coefficients.weight, self.task_names, "evaluated")
        self._eval_params = {"merged": self.eval_params(whole=False)}
        if self.trainer.state.fn != TrainerFn.FITTING:
            reference = self.reference_params()
            if reference is not None:
                self._eval_params["reference"] = reference

    def _eval_step(self, batch: dict[str, Tensor], dataloader_idx: int, split: str) -> None:
        dm = self._datamodule()
        task = dm.eval_tasks(split)[dataloader_idx]
        self.engine.eval_update(
            self.metrics[task], task, split, batch, self._eval_params, dm.rows(task)[split]
        )
        if split == "val" and task in self.task_names and not self.is_static:
            assert self.engine.family is not None
            if "val" in self.engine.family.divergence_splits:  # held-out, label-free selection signal
                params = self._eval_params["merged"]  # no merge per batch (sharded: a collective)
                value = float(self.engine.divergence({task: batch}, "val", params)[task])
                total = self._val_divergence.setdefault(task, [0.0, 0])
                total[0] += value * len(batch["idx"])
                total[1] += len(batch["idx"])

    def _log_val_divergence(self) -> None:
        """Log the divergence on the val inputs (labels unused): per task, and summed as train/loss is.

        ``val/divergence`` is what ``ModelCheckpoint`` / ``EarlyStopping`` monitor to select or stop on
        inputs held out of training, without labels.
        """
        means = {task: total / count for task, (total, count) in self._val_divergence.items() if count}
        self._val_divergence = {}
        for task, value in means.items():
            self.log(f"val/{self.hparams.objective}/{task}", value, sync_dist=True)
        if means:
            self.log("val/divergence", sum(means.values()), sync_dist=True)

    def _eval_end(self, split: str) -> None:
        self.engine.drain()  # sharded per block: ranks done early stand in for the others' forwards
        prefix = "val" if split == "val" else "test"
        if split == "val":
            self._log_val_divergence()
        results = []
        reported = self.trainer.state.fn != TrainerFn.FITTING  # the table and report: intervals need rows
        for task in self._datamodule().eval_tasks(split):
            m = self.metrics[task]
            ref = float(m["reference"].compute()) if "reference" in self._eval_params else None
            n = len(self._datamodule().dataset(task, split))
            expert, merged_acc = float(m["expert"].compute()), float(m["merged"].compute())
            names = ["expert", *self._eval_params]  # merged (and reference)
            rows = None  # each row's 0/1 correctness, gathered from every rank (a collective: all ask)
            if reported and all(name + ROWS in m for name in names):
                rows = {name: m[name + ROWS].compute().numpy() for name in names}
            held_out = task in self.held_out
            results.append(TaskResult(task, n, expert, merged_acc, ref, held_out=held_out, rows=rows))
            self.log(f"{prefix}/acc/{task}", results[-1].merged, sync_dist=True)
            self.log(f"{prefix}/expert_acc/{task}", results[-1].expert, sync_dist=True)
            for metric in m.values():
                metric.reset()
        self._eval_params = {}
        if not results:
            return
        self.log(f"{prefix}/anp", anp(results), prog_bar=True, sync_dist=True)
        self.last_results = results
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if self.trainer.state.fn != TrainerFn.FITTING and self.trainer.is_global_zero:
            score = "score" if self.engine.family.task_kind == "generative" else "accuracy"
            title = f"Per-task {score} on {split} ({self.describe()})"
            table = format_table(results, reference_name=self.hparams.reference.replace("_", " "))
            print(f"\n{title}:\n{table}\n", flush=True)
            if log_dir:
                write_report(results, log_dir, split)

    def on_validation_epoch_start(self) -> None:  # noqa: D102
        self._eval_start()

    def on_test_epoch_start(self) -> None:  # noqa: D102
        self._eval_start()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update per-task accuracy of the merged model, the expert and (outside fit) the reference."""
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update per-task accuracy of the merged model, the expert and the reference."""
        self._eval_step(batch, dataloader_idx, "test")

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        self._eval_end("val")

    def on_test_epoch_end(self) -> None:  # noqa: D102
        self._eval_end("test")

    def describe(self) -> str:
        """The merge method in words, e.g. ``layer-wise js merge`` or ``static ties merge``."""
        return self.engine.describe(self.hparams.method)

    def on_fit_start(self) -> None:
        """Refuse to train a static merge."""
        check_trainable(self.hparams.method)

    artefacts_after_test = False
    """The CLI sets it: the figures are written after the test table (so a full disk cannot lose it)."""

    def on_fit_end(self) -> None:
        """Write the fit's figures, unless the CLI writes them after the test table."""
        if not self.artefacts_after_test:
            self.write_fit_artefacts()

    def write_fit_artefacts(self) -> None:
        """Write the coefficient heatmap, coefficients.json and the divergence curve to the log dir."""
        log_dir = self.trainer.log_dir
        if not self.trainer.is_global_zero or not log_dir:
            return
        merged = self.build()
        out = Path(log_dir)
        out.mkdir(parents=True, exist_ok=True)
        table = merged.coefficients().detach().cpu()  # (T, G)
        groups = merged.coefficients.group_labels()
        payload = {
            "tasks": self.task_names,
            "groups": groups,
            "start_from": self.hparams.start_from,  # coefficients are around this static merge
            "coefficients": table.tolist(),
        }
        write_atomic(out / "coefficients.json", json.dumps(payload, indent=1), PLOT_FIX)
        plot_coefficients(table, self.task_names, groups, out / "coefficients.png")
        if isinstance(self.logger, CSVLogger):
            self.logger.save()
            metrics = Path(self.logger.log_dir) / "metrics.csv"
            if metrics.is_file():
                plot_divergence(metrics, out / "divergence.png")

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the expert-set fingerprint and the checkpoint format beside the coefficients."""
        merged = self.build()
        table = merged.coefficients.weight
        nonfinite.refuse_nonfinite_merge(table, self.task_names, "saved", RunStoppedError)
        checkpoint[checkpoint_io.FORMAT_KEY] = checkpoint_io.CHECKPOINT_FORMAT
        checkpoint["divmerge"] = {
            "fingerprint": self.fingerprint,
            "tasks": self.task_names,
            "granularity": self.hparams.granularity,
            "space_options": dict(self.hparams.space_options or {}),
            "start": {"from": self.hparams.start_from, "options": dict(self.hparams.start_options or {})},
            "tensor_names": merged.names,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of other experts, a newer divmerge, lacking coefficients or not finite."""
        meta = checkpoint.get("divmerge")
        if not isinstance(meta, dict):
            raise DivMergeError("This checkpoint was not written by divmerge: pass a divmerge checkpoint.")
        path = self._trainer.ckpt_path if self._trainer is not None else None
        checkpoint_io.check_format(checkpoint, path)
        checkpoint_io.check_finite_coefficients(checkpoint, path)
        self.check_checkpoint_meta(meta)
        self.check_state_dict(checkpoint.get("state_dict"))

    def check_state_dict(self, state: Any) -> None:
        """Refuse a checkpoint ``state_dict`` that does not hold exactly this module's tensors (one line).

        Args:
            state: The checkpoint's ``state_dict`` entry.
        """
        ours = set(self.state_dict())
        theirs = set(state) if isinstance(state, dict) else set()
        if theirs != ours:
            lacking, extra = sorted(ours - theirs), sorted(theirs - ours)
            problem = f"lacks {lacking[:3]}" if lacking else f"holds unknown tensors {extra[:3]}"
            raise DivMergeError(
                f"The checkpoint's state_dict {problem} (edited or damaged): pass an intact .ckpt written by "
                "divmerge, or start a fresh run without --ckpt_path."
            )
