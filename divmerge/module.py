"""The LightningModule: learn merge coefficients by minimising the summed divergence to the experts.

training_step = sum over tasks t of mean_{x in batch_t} D(expert_t(.|x) || merged(.|x))
(DivMerge, arXiv 2509.02108), with expert outputs read from the teacher cache.
"""

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from divmerge import causal_lm
from divmerge.baselines import STATIC_METHODS, TA_LAMBDA, static_merge
from divmerge.coefficients import GRANULARITIES, Granularity
from divmerge.data import MergeDataModule
from divmerge.errors import DivMergeError
from divmerge.evaluation import TaskResult, anp, format_table, write_report
from divmerge.experts import load_experts, resolve_source
from divmerge.functional import BackbonePass, MergedModel
from divmerge.objectives import get_objective
from divmerge.plots import plot_coefficients, plot_divergence
from divmerge.teachers import cache_path, compute_logprobs, get_or_compute, load_cached
from divmerge.timing import TEACHER_PHASE

log = logging.getLogger(__name__)
_STAGE_SPLITS = {"fit": ("unlabelled", "val"), "validate": ("val",), "test": ("test",)}


LEARNED = "divmerge"


def check_method(name: str, options: dict[str, Any], learned_ok: bool = True) -> None:
    """Fail early on an unknown merge method or options it does not take."""
    valid = ([LEARNED] if learned_ok else []) + sorted(STATIC_METHODS)
    if name not in valid:
        raise DivMergeError(f"Unknown merge method {name!r}: use one of {valid}.")
    if name == LEARNED:
        if options:
            raise DivMergeError(
                f"method_options {sorted(options)} only apply to static methods: remove them."
            )
        return
    unknown = sorted(set(options) - set(STATIC_METHODS[name].options))
    if unknown:
        raise DivMergeError(
            f"Merge method {name!r} takes no option {unknown}: use {list(STATIC_METHODS[name].options)}."
        )


def check_trainable(method: str) -> None:
    """Refuse ``fit`` for a static merge, which has nothing to learn."""
    if method != LEARNED:
        raise DivMergeError(
            f"Method {method!r} is a static merge with nothing to train: run `python train.py test "
            f"--model.method {method}` (or validate) instead of fit."
        )


def default_cache_dir() -> str:
    """$DIVMERGE_CACHE, else ~/.cache/divmerge."""
    from divmerge.zoo import default_cache_dir as zoo_default

    return str(zoo_default())


class DivMergeModule(L.LightningModule):
    """Learned model merging: the merge coefficients are the only trainable tensors.

    Args:
        experts: Task name -> expert source (local HF directory, hub id, or ``zoo:<task>`` for a demo
            expert). Task names must match ``data.tasks``.
        base: Source of the pretrained base model the experts were fine-tuned from.
        granularity: ``task`` (one coefficient per task), ``layer`` (one per task per parameter tensor)
            or ``block`` (one per task per transformer block).
        objective: ``js`` (Jensen-Shannon, DivMerge), ``kl`` (KL(expert || merged)) or ``entropy``
            (AdaMerging).
        init: Initial coefficient value; None means 1/T.
        clamp: Optional (low, high) bounds for the coefficients; None leaves them unconstrained.
        lr: Adam learning rate for the coefficients.
        lr_schedule: ``cosine`` decays the learning rate to 0 over the run's total steps (max_epochs /
            max_steps); ``constant`` keeps it.
        method: ``divmerge`` learns the coefficients (with ``objective`` and ``granularity``); the name
            of a static merge (``average``, ``task_arithmetic``, ``ties``, ``dare``) merges without
            training and is evaluated by ``validate`` / ``test`` on the same code.
        method_options: Options of a static ``method`` (e.g. ``{lambda_: 1.0, density: 0.2}`` for ties).
        reference: Static merge reported beside the learned one by validate/test ("reference" column).
        reference_options: Options of the reference merge (e.g. ``{lambda_: 0.3}``).
        task_vector_dtype: Storage dtype of the task vectors: ``float32``, or ``bfloat16`` / ``float16`` to
            halve their memory (coefficients and the merge arithmetic stay float32).
        backbone_pass: ``per_task`` (default) runs each task's forward+backward in turn and accumulates
            the merged tensors' gradients: activations of one task's batch at a time, so memory grows by
            one task vector per expert. ``joint`` runs every task in one concatenated pass: larger
            matmuls, but activation memory grows with the number of tasks.
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
            (``exact_match``, whitespace stripped, or a torchmetrics.text metric); ANP divides the merged
            model's score by the expert's.

    """

    def __init__(
        self,
        experts: dict[str, str],
        base: str = "zoo:minilm",
        granularity: Granularity = "layer",
        objective: str = "js",
        init: float | None = None,
        clamp: tuple[float, float] | None = None,
        lr: float = 1e-2,
        lr_schedule: Literal["constant", "cosine"] = "cosine",
        method: str = "divmerge",
        method_options: dict[str, float | int | str] | None = None,
        reference: str = "task_arithmetic",
        reference_options: dict[str, float | int | str] | None = None,
        task_vector_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        backbone_pass: BackbonePass = "per_task",
        held_out: dict[str, str] | None = None,
        cache_dir: str | None = None,
        max_new_tokens: int = 16,
        teacher_top_k: int | None = None,
        generation_metric: causal_lm.GenerationMetric = "exact_match",
    ) -> None:
        super().__init__()
        if not experts:
            raise DivMergeError("No experts given: list them under model.experts as `task_name: path`.")
        if max_new_tokens < 1 or (teacher_top_k is not None and teacher_top_k < 1):
            raise DivMergeError(
                f"max_new_tokens ({max_new_tokens}) and teacher_top_k ({teacher_top_k}) must be at least 1 "
                "(leave teacher_top_k unset for full distributions)."
            )
        if granularity not in GRANULARITIES:
            raise DivMergeError(f"Unknown granularity {granularity!r}: use one of {list(GRANULARITIES)}.")
        self.objective = get_objective(objective)
        check_method(method, method_options or {})
        check_method(reference, reference_options or {}, learned_ok=False)
        self.save_hyperparameters()
        self.cache_dir = cache_dir or default_cache_dir()
        self.merged: MergedModel | None = None
        self.generative = False
        self.fingerprint: str | None = None
        self.task_digests: list[str] = []
        self.metrics = nn.ModuleDict()
        self._teachers: dict[tuple[str, str], Tensor] = {}
        self._eval_params: dict[str, Tensor] | None = None
        self._reference_params: dict[str, Tensor] | None = None
        self.last_results: list[TaskResult] = []
        self.phase_seconds: dict[str, float] = {}

    # ---------------------------------------------------------------- building
    @property
    def task_names(self) -> list[str]:
        """Task (expert) names in order."""
        return list(self.hparams.experts)

    @property
    def held_out(self) -> list[str]:
        """Held-out task names (evaluated, not merged)."""
        return list(self.hparams.held_out or {})

    @property
    def all_tasks(self) -> list[str]:
        """Merged tasks then held-out tasks: the index order of heads in the merged model."""
        return [*self.task_names, *self.held_out]

    def prepare_data(self) -> None:
        """Rank 0: fetch or build (demo) experts so every rank can load them in setup."""
        for source in [
            self.hparams.base,
            *self.hparams.experts.values(),
            *(self.hparams.held_out or {}).values(),
        ]:
            resolve_source(source, build=True)

    def build(self) -> MergedModel:
        """Load base and experts and create the coefficients (once)."""
        if self.merged is None:
            dtype = getattr(torch, self.hparams.task_vector_dtype)
            experts = load_experts(self.hparams.base, self.hparams.experts, self.hparams.held_out, dtype)
            self.merged = MergedModel(
                experts,
                self.hparams.granularity,
                self.hparams.init,
                self.hparams.clamp,
                task_vector_dtype=dtype,
            )
            self.fingerprint = experts.fingerprint
            self.task_digests = experts.task_digests
            self.num_labels = dict(zip(experts.all_tasks, experts.num_labels, strict=True))
            self.generative = experts.generative
            for task, n in self.num_labels.items():
                self.metrics[task] = nn.ModuleDict(
                    {
                        k: causal_lm.generation_metric(self.hparams.generation_metric)
                        if self.generative
                        else MulticlassAccuracy(num_classes=n, average="micro")
                        for k in ("merged", "expert", "reference")
                    }
                )
        return self.merged

    def check_data(self, dm: object) -> MergeDataModule:
        """Check that ``dm`` is a MergeDataModule with exactly one task per expert."""
        if not isinstance(dm, MergeDataModule):
            raise DivMergeError("DivMergeModule needs a MergeDataModule: pass data= / --data to the trainer.")
        if sorted(dm.task_names) != sorted(self.all_tasks):
            raise DivMergeError(
                f"Data tasks {dm.task_names} and experts {self.all_tasks} differ: give every task an "
                "expert under model.experts (or model.held_out) with the same name."
            )
        return dm

    def check_checkpoint_meta(self, meta: dict[str, Any]) -> None:
        """Refuse checkpoint metadata (``checkpoint["divmerge"]``) made with a different expert set."""
        self.build()
        if meta["fingerprint"] != self.fingerprint:
            raise DivMergeError(
                f"The checkpoint was made with another expert set (tasks {meta['tasks']}, fingerprint "
                f"{meta['fingerprint']}) than the configured one (tasks {self.task_names}, fingerprint "
                f"{self.fingerprint}): resume with the experts it was made with, or start a fresh run "
                "without --ckpt_path."
            )

    def _datamodule(self) -> MergeDataModule:
        return self.check_data(getattr(self.trainer, "datamodule", None))

    def setup(self, stage: str) -> None:
        """Load experts, check the data against them, and fill the teacher cache for this stage."""
        merged = self.build()
        dm = self._datamodule()
        self._check_kinds(dm)
        for task in self.all_tasks:
            names = dm.label_names(task)
            if names is not None and len(names) != self.num_labels[task]:
                raise DivMergeError(
                    f"Task {task!r} has {len(names)} classes {list(names)} but its expert outputs "
                    f"{self.num_labels[task]}: check label_names or the expert."
                )
        splits = _STAGE_SPLITS.get(stage, ("unlabelled", "val", "test"))
        if self.shards_task_vectors:  # once sharded, a merge is a collective: no rank-0-only teachers later
            splits = ("unlabelled", "val", "test")
        wanted = [(task, split) for task in self.task_names for split in splits]
        wanted += [(task, split) for task in self.held_out for split in splits if split != "unlabelled"]
        paths = {}
        for task, split in wanted:
            ds = dm.dataset(task, split)
            self._check_labels(task, split, ds.labels)
            t = self.all_tasks.index(task)
            digest = ds.digest() + (self._generation_key(split) if self.generative else "")
            paths[task, split] = cache_path(self.cache_dir, task, split, self.task_digests[t], digest)
        started = time.perf_counter()
        if self.trainer.is_global_zero:
            merged.to(self.trainer.strategy.root_device)
            for (task, split), path in paths.items():
                if len(dm.dataset(task, split)):
                    _, built = get_or_compute(
                        path, lambda task=task, split=split: self._teacher(dm, task, split)
                    )
                    if built:
                        rank_zero_info(f"teacher cache: built {task}/{split} -> {path}")
        self.trainer.strategy.barrier("divmerge_teacher_cache")
        self.phase_seconds[TEACHER_PHASE] = time.perf_counter() - started  # read by divmerge.timing
        for key, path in paths.items():
            if len(dm.dataset(*key)):
                cached = load_cached(path)
                if cached is None:
                    raise DivMergeError(
                        f"Teacher cache {path} is missing on this rank: use a shared cache_dir."
                    )
                self._teachers[key] = cached

    @property
    def shards_task_vectors(self) -> bool:
        """Whether the strategy is Lightning's ``ModelParallelStrategy`` (task vectors get sharded)."""
        trainer = self._trainer
        return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``, keep only this rank's slice of the task vectors.

        Each of the data-parallel ranks keeps 1/N of every stacked task vector (``divmerge.sharding``): for
        expert sets whose T task vectors do not fit one device. Use ``tensor_parallel_size: 1`` (the ranks
        are data parallel) and ``save_distributed_checkpoint: false`` (one small coefficient file).
        """
        if not self.shards_task_vectors or self.merged is None or self.merged.sharded:
            return
        strategy = self.trainer.strategy
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
        if getattr(strategy, "_save_distributed_checkpoint", False):
            raise DivMergeError(
                "Set ModelParallelStrategy's save_distributed_checkpoint: false: divmerge checkpoints "
                "hold only the coefficients, written as one small file."
            )
        total = sum(t.numel() * t.element_size() for _, t in self.merged.task_vectors.items())
        self.merged.shard(self.device_mesh["data_parallel"])
        local = sum(t.to_local().numel() * t.element_size() for _, t in self.merged.task_vectors.items())
        print(
            f"divmerge: rank {self.global_rank} keeps {local / 1e6:.2f} of {total / 1e6:.2f} MB of the task "
            "vectors",
            flush=True,
        )

    def _check_labels(self, task: str, split: str, labels: list[int] | None) -> None:
        if labels and not 0 <= min(labels) <= max(labels) < self.num_labels[task]:
            raise DivMergeError(
                f"Task {task!r} {split} labels span {min(labels)}..{max(labels)} but its expert has "
                f"{self.num_labels[task]} classes: labels must be class ids 0..{self.num_labels[task] - 1}."
            )

    @torch.no_grad()
    def _teacher(self, dm: MergeDataModule, task: str, split: str) -> Tensor:
        """Expert outputs on one task split: the merged model with one-hot coefficients.

        For a held-out task the "expert" is the base backbone (all-zero coefficients) with its head.
        """
        if self.generative:
            return self._generative_teacher(dm, task, split)
        merged = self.build()
        t = self.all_tasks.index(task)
        device = self.trainer.strategy.root_device
        table = merged.one_hot_table(t) if task in self.task_names else merged.base_table()
        params = merged.merged_params(table.to(device))

        def forward(batch: dict[str, Tensor]) -> Tensor:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
            return merged.task_logits(t, params, **inputs)

        ds = dm.dataset(task, split)
        return compute_logprobs(forward, dm.eval_loader(task, split), len(ds))

    # ---------------------------------------------------------------- generative (causal-LM) experts
    def _check_kinds(self, dm: MergeDataModule) -> None:
        """Refuse tasks whose kind does not match the experts (classifiers vs causal LMs)."""
        kind = "generative" if self.generative else "classification"
        wrong = [spec.name for spec in dm.tasks if spec.kind != kind]
        if wrong and self.generative:
            raise DivMergeError(
                f"Tasks {wrong} are classification tasks but the experts are causal LMs: set "
                "`kind: generative` and a prompt_template on each."
            )
        if wrong:
            raise DivMergeError(
                f"Tasks {wrong} are generative but the experts are classifiers: give generative tasks "
                "causal-LM experts, or remove `kind: generative`."
            )
        if self.generative:
            if self.hparams.backbone_pass != "per_task":
                raise DivMergeError(
                    "Causal-LM experts are trained one task at a time: use backbone_pass: per_task."
                )
            self._generation_ids()  # a tokenizer without EOS fails here, before any teacher is built

    def _generation_key(self, split: str) -> str:
        """The generation settings a generative teacher cache depends on (part of its file name)."""
        if split != "unlabelled":  # evaluation keeps the answers only
            return f"-g{self.hparams.max_new_tokens}answers"
        return f"-g{self.hparams.max_new_tokens}k{self.hparams.teacher_top_k or 'full'}"

    def _generation_ids(self) -> tuple[int, int]:
        """(EOS id, padding id) of the base tokenizer; a tokenizer without EOS is refused."""
        tokenizer = self._datamodule().tokenizer
        return causal_lm.eos_token_id(tokenizer, self.num_labels[self.task_names[0]]), tokenizer.pad_token_id

    def _generative_teacher(self, dm: MergeDataModule, task: str, split: str) -> dict[str, Tensor]:
        """Expert ``task``'s greedy answers on a split, with answer distributions for the training split."""
        eos_id, pad_id = self._generation_ids()
        return causal_lm.build_teacher(
            self.build(),
            self.task_names.index(task),
            dm.eval_loader(task, split),
            len(dm.dataset(task, split)),
            eos_id,
            pad_id,
            self.hparams.max_new_tokens,
            self.hparams.teacher_top_k,
            keep_distributions=split == "unlabelled",
        )

    def _generative_eval_step(self, batch: dict[str, Tensor], task: str, split: str) -> None:
        """Score the answers generated by the merged model, the expert (cached) and the reference merge."""
        dm = self._datamodule()
        eos_id, pad_id = self._generation_ids()
        idx = batch["idx"].cpu()
        references = [dm.rows(task)[split].answers[i] for i in idx.tolist()]
        metrics = self.metrics[task]

        def answers(params: dict[str, Tensor]) -> list[str]:
            prompts, limit = causal_lm.prompts_of(batch), self.hparams.max_new_tokens
            out = causal_lm.generate(self.build(), params, prompts, eos_id, pad_id, limit)
            return causal_lm.decode_answers(dm.tokenizer, out.tokens, out.lengths)

        causal_lm.update_generation_metric(metrics["merged"], answers(self._eval_params), references)
        cached = self._teachers[task, split]
        expert = causal_lm.decode_answers(dm.tokenizer, cached["tokens"][idx], cached["lengths"][idx])
        causal_lm.update_generation_metric(metrics["expert"], expert, references)
        if self._reference_params is not None:
            causal_lm.update_generation_metric(
                metrics["reference"], answers(self._reference_params), references
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
        merged = self.build()
        batch = {task: b for task, b in batch.items() if task in self.hparams.experts}  # held-out: eval only
        index = {task: self.task_names.index(task) for task in batch}
        inputs = {
            index[task]: {k: b[k] for k in ("input_ids", "attention_mask")} for task, b in batch.items()
        }
        if self.generative:
            answers = {
                index[task]: {k: v[b["idx"].cpu()] for k, v in self._teachers[task, "unlabelled"].items()}
                for task, b in batch.items()
            }  # task -> the batch's rows of its teacher cache
            pad_id = self._datamodule().tokenizer.pad_token_id
            loss, per_task = causal_lm.step_loss(merged, self.objective, inputs, answers, pad_id)
        else:
            teachers = {
                index[task]: self._teachers[task, "unlabelled"][b["idx"].cpu()] for task, b in batch.items()
            }  # task -> (B_t, C_t)

            def task_loss(t: int, student: Tensor) -> Tensor:  # student: (B_t, C_t)
                return self.objective(teachers[t].to(student.device), student).mean()

            loss, per_task = merged.step_loss(
                merged.merged_params(), inputs, task_loss, self.hparams.backbone_pass
            )
        for task in batch:
            size = len(batch[task]["idx"])
            self.log(f"train/{self.hparams.objective}/{task}", per_task[index[task]], batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=sum(len(b["idx"]) for b in batch.values()))
        return loss

    # ---------------------------------------------------------------- evaluation
    @property
    def is_static(self) -> bool:
        """Whether ``method`` is a static merge (no training)."""
        return self.hparams.method != LEARNED

    def static_params(self, method: str, options: dict[str, Any] | None) -> dict[str, Tensor]:
        """Merged backbone tensors of a static merge (LoRA adapters densified), named as ``merged_params``."""
        merged = self.build()
        out = static_merge(method, dict(merged.base.items()), merged.dense_task_vectors(), **(options or {}))
        return {merged.full_name(name): tensor for name, tensor in out.items()}

    def eval_params(self) -> dict[str, Tensor]:
        """The merged tensors this module evaluates: learned coefficients or the static merge."""
        if self.is_static:
            return self.static_params(self.hparams.method, self.hparams.method_options)
        with torch.no_grad():
            return {k: v.detach() for k, v in self.build().merged_params().items()}

    def reference_params(self) -> dict[str, Tensor] | None:
        """The reference column's merged tensors (None where sharded task vectors cannot give them).

        With sharded task vectors only the linear references (``task_arithmetic``, ``average``) are
        computed, through the sharded merge with constant coefficients.
        """
        merged, method = self.build(), self.hparams.reference
        if not merged.sharded:
            return self.static_params(method, self.hparams.reference_options)
        options = self.hparams.reference_options or {}
        constant = {
            "task_arithmetic": float(options.get("lambda_", TA_LAMBDA)),
            "average": 1 / len(self.task_names),
        }
        if method not in constant:
            rank_zero_info(f"reference {method!r} needs whole task vectors: not computed with sharding.")
            return None
        with torch.no_grad():
            return {
                k: v.detach()
                for k, v in merged.merged_params(merged.constant_table(constant[method])).items()
            }

    def _eval_start(self) -> None:
        self._eval_params = self.eval_params()
        self._reference_params = None
        if self.trainer.state.fn != TrainerFn.FITTING:
            self._reference_params = self.reference_params()

    def _eval_step(self, batch: dict[str, Tensor], dataloader_idx: int, split: str) -> None:
        merged = self.build()
        task = self._datamodule().eval_tasks(split)[dataloader_idx]
        if self.generative:
            self._generative_eval_step(batch, task, split)
            return
        t = self.all_tasks.index(task)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"]
        metrics = self.metrics[task]
        metrics["merged"].update(merged.task_logits(t, self._eval_params, **inputs).argmax(-1), labels)
        expert = self._teachers[task, split][batch["idx"].cpu()].argmax(-1).to(labels.device)
        metrics["expert"].update(expert, labels)
        if self._reference_params is not None:
            metrics["reference"].update(
                merged.task_logits(t, self._reference_params, **inputs).argmax(-1), labels
            )

    def _eval_end(self, split: str) -> None:
        prefix = "val" if split == "val" else "test"
        results = []
        for task in self._datamodule().eval_tasks(split):
            m = self.metrics[task]
            ref = float(m["reference"].compute()) if self._reference_params is not None else None
            n = len(self._datamodule().dataset(task, split))
            expert, merged_acc = float(m["expert"].compute()), float(m["merged"].compute())
            results.append(TaskResult(task, n, expert, merged_acc, ref, held_out=task in self.held_out))
            self.log(f"{prefix}/acc/{task}", results[-1].merged, sync_dist=True)
            self.log(f"{prefix}/expert_acc/{task}", results[-1].expert, sync_dist=True)
            for metric in m.values():
                metric.reset()
        self._eval_params = self._reference_params = None
        if not results:
            return
        self.log(f"{prefix}/anp", anp(results), prog_bar=True, sync_dist=True)
        self.last_results = results
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        if self.trainer.state.fn != TrainerFn.FITTING and self.trainer.is_global_zero:
            title = f"Per-task accuracy on {split} ({self.describe()})"
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
        if self.is_static:
            return f"static {self.hparams.method} merge"
        return f"{self.hparams.granularity}-wise {self.hparams.objective} merge"

    def on_fit_start(self) -> None:
        """Refuse to train a static merge."""
        check_trainable(self.hparams.method)

    def on_fit_end(self) -> None:
        """Write the coefficient heatmap, coefficients.json and the divergence curve to the log dir."""
        log_dir = self.trainer.log_dir
        if not self.trainer.is_global_zero or not log_dir:
            return
        merged = self.build()
        out = Path(log_dir)
        out.mkdir(parents=True, exist_ok=True)
        table = merged.coefficients().detach().cpu()  # (T, G)
        groups = merged.coefficients.group_labels()
        (out / "coefficients.json").write_text(
            json.dumps({"tasks": self.task_names, "groups": groups, "coefficients": table.tolist()}, indent=1)
        )
        plot_coefficients(table, self.task_names, groups, out / "coefficients.png")
        if isinstance(self.logger, CSVLogger):
            self.logger.save()
            metrics = Path(self.logger.log_dir) / "metrics.csv"
            if metrics.is_file():
                plot_divergence(metrics, out / "divergence.png")

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the expert-set fingerprint beside the coefficients."""
        merged = self.build()
        checkpoint["divmerge"] = {
            "fingerprint": self.fingerprint,
            "tasks": self.task_names,
            "granularity": self.hparams.granularity,
            "tensor_names": merged.names,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint made with a different expert set."""
        meta = checkpoint.get("divmerge")
        if meta is None:
            raise DivMergeError("This checkpoint was not written by divmerge: pass a divmerge checkpoint.")
        self.check_checkpoint_meta(meta)
