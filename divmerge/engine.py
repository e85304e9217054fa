"""The merge engine, Lightning-free: build the merged model, its teachers, the step loss and evaluation.

Every caller uses it: the LightningModule (``divmerge.lightning.module``), export and the benchmarks.

    tau_t      = theta_t - theta_0
    theta(l)   = theta_0(l) + sum_t c[t, g(l)] * tau_t(l)
    step loss  = sum_t mean_{x in batch_t} D(expert_t(.|x) || merged(.|x))     (DivMerge, arXiv 2509.02108)

with expert outputs read from the teacher cache, computed once per task split.
"""

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from divmerge import static
from divmerge.core.coefficients import Granularity, get_space
from divmerge.core.expert_set import ExpertSet
from divmerge.core.merged_model import (
    MergedModel,
    MergeMode,
    MergeModeOption,
    check_merge_mode,
    check_shardable,
)
from divmerge.data import Rows, TaskDataset, TaskSpec
from divmerge.errors import DivMergeError
from divmerge.experts.sources import default_cache_dir
from divmerge.experts.weight_files import column_range
from divmerge.families import FAMILIES, detect_family, load_experts
from divmerge.families.base import ROWS, ModelFamily, RowCorrectness, Teacher
from divmerge.families.classification import BackbonePass
from divmerge.objectives import Objective, get_objective
from divmerge.teachers import cache_path, get_or_compute, load_cached, remove_stale_temporaries, save_atomic

log = logging.getLogger(__name__)
LEARNED = "divmerge"
"""The ``method`` name of a learned merge; every other method name is a static merge."""
DEFAULT_LR = 0.05
"""Adam learning rate of the coefficients, everywhere (module, configs, benchmarks): at k = 6 demo tasks
it gave ANP 90.8 against 88.0 with 0.02 (benchmarks/merge_quality.py; README "Why JS layer-wise stops
near 91")."""
TaskVectorDtype = Literal["float32", "bfloat16", "float16"]
Split = Literal["unlabelled", "val", "test"]


def check_method(name: str, options: Mapping[str, Any], learned_ok: bool = True) -> None:
    """Fail early on an unknown merge method or options it does not take (static ones: ``divmerge.static``).

    Args:
        name: ``divmerge`` (learned) or a static method's name.
        options: The method's options.
        learned_ok: Whether the learned merge is allowed here (not as a reference).
    """
    if name == LEARNED and learned_ok:
        if options:
            raise DivMergeError(
                f"method_options {sorted(options)} only apply to static methods: remove them."
            )
        return
    if name not in static.STATIC_METHODS:
        valid = ([LEARNED] if learned_ok else []) + sorted(static.STATIC_METHODS)
        raise DivMergeError(f"Unknown merge method {name!r}: use one of {valid}.")
    static.check_method(name, options)


def check_start(method: str | None, options: Mapping[str, Any]) -> None:
    """Fail early on a start (``start_from``) that is not a static method, or options without one."""
    if method is None:
        if options:
            raise DivMergeError(
                "start_options are set without start_from: name the static method to start from."
            )
        return
    try:
        check_method(method, options, learned_ok=False)
    except DivMergeError as err:
        raise DivMergeError(f"start_from: {err}") from None


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse a directory that cannot be created or written (a file in the way, no permission).

    Args:
        path: The directory (it need not exist yet).
        what: How to name it in the error, e.g. ``"model.cache_dir"``.
    """
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise DivMergeError(f"{what} {str(path)!r} is under {str(existing)!r}, a file: choose a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DivMergeError(
            f"{what} {str(path)!r} is not writable ({str(existing)!r}): choose a writable directory."
        )


def check_trainable(method: str) -> None:
    """Refuse ``fit`` for a static merge, which has nothing to learn."""
    if method != LEARNED:
        raise DivMergeError(
            f"Method {method!r} is a static merge with nothing to train: run `python train.py test "
            f"--model.method {method}` (or validate) instead of fit."
        )


AUTO_DEVICE_SHARE = 0.25
"""``merge_mode: auto`` merges per block once the whole merge's float32 tensors and their gradient would take
more than this share of the device's memory."""


def device_memory(device: torch.device | None) -> int:
    """Bytes of memory of ``device``: a GPU's total memory, or this machine's RAM (CPU, or None)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_merge_mode(option: str, numel: int, sharded: bool, memory: int) -> tuple[MergeMode, str]:
    """The merge mode a training step uses, and why.

    ``auto`` picks ``per_block`` when the base and task vectors are sharded (no rank should then hold a
    whole merged model) or when the whole merge's float32 tensors and gradient (8 bytes per merged
    parameter) exceed ``AUTO_DEVICE_SHARE`` of the device's memory; otherwise ``whole``, which is as
    fast or faster (per-block recomputes each block's merge in backward: 1.05x the step on SmolLM2-135M).

    Args:
        option: The configured ``merge_mode``: ``auto``, ``whole`` or ``per_block``.
        numel: Parameters merged (the model's size P).
        sharded: Whether the base and task vectors are sharded over ranks.
        memory: Bytes of memory of the device training runs on.

    Returns:
        (``whole`` or ``per_block``, a reason in a few words).
    """
    if option != "auto":
        return option, "as configured"  # type: ignore[return-value]
    if sharded:
        return "per_block", "auto: the base and task vectors are sharded, so no rank holds a whole merge"
    need, share = 8 * numel / 1e9, AUTO_DEVICE_SHARE * memory / 1e9
    if need > share:
        return "per_block", f"auto: the whole merge and its gradient ({need:.1f} GB) exceed {share:.1f} GB"
    return "whole", f"auto: the whole merge and its gradient ({need:.2f} GB) fit in {share:.1f} GB"


class TaskData(Protocol):
    """What the engine reads of the data (``divmerge.lightning.datamodule.MergeDataModule`` has it)."""

    tasks: list[TaskSpec]
    max_length: int

    @property
    def task_names(self) -> list[str]:
        """Task names, in order."""
        ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer."""
        ...

    def rows(self, task: str) -> dict[str, Rows]:
        """The task's rows by split."""
        ...

    def label_names(self, task: str) -> tuple[str, ...] | None:
        """The task's class names, if known."""
        ...

    def dataset(self, task: str, split: Split) -> TaskDataset:
        """The task split's tokenized dataset."""
        ...

    def eval_loader(self, task: str, split: Split) -> DataLoader:
        """The task split in order, for teachers and evaluation."""
        ...


class Merger:
    """Learned (or static) merging of T experts of one base, independent of any training framework.

    Args:
        base: Source of the pretrained base model the experts were fine-tuned from.
        experts: Task name -> expert source, in task order.
        held_out: Held-out task name -> a classifier whose head scores that task on the merged backbone.
        granularity: Coefficient space (``divmerge.core.coefficients.SPACES``).
        objective: Divergence: a name in ``divmerge.objectives.OBJECTIVES``, or a per-example function
            (teacher rows, merged logits) -> (B,).
        init: Initial coefficient value; None means 1/T.
        clamp: Optional (low, high) bounds for the coefficients.
        task_vector_dtype: Storage dtype of the task vectors.
        backbone_pass: ``per_task`` or ``joint`` (see ``divmerge.families.classification.step_loss``).
        family_options: The model family's settings (``max_new_tokens``, ``teacher_top_k``,
            ``generation_metric``; each family reads its own).
        cache_dir: Teacher cache directory; None means $DIVMERGE_CACHE or ~/.cache/divmerge.
        space_options: Options of the coefficient space (``svd``: ``rank``).
        start_from: A static method (``divmerge.static.STATIC_METHODS``) whose merge the learned
            coefficients start from: the merge becomes theta_s + sum_t c_t tau_t, with c initialised
            to 0 unless ``init`` says otherwise, so step 0 is the static merge. None starts at theta_0.
        start_options: Options of ``start_from`` (its defaults where unset).
        merge_mode: ``whole`` or ``per_block`` (see ``divmerge.core.per_block``): when a training step
            merges the tensors; ``auto`` picks one when the model is built (``choose_merge_mode``).
    """

    def __init__(
        self,
        base: str,
        experts: Mapping[str, str],
        held_out: Mapping[str, str] | None = None,
        granularity: Granularity = "layer",
        objective: str | Objective = "js",
        init: float | None = None,
        clamp: tuple[float, float] | None = None,
        task_vector_dtype: TaskVectorDtype = "float32",
        backbone_pass: BackbonePass = "per_task",
        family_options: Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        space_options: Mapping[str, Any] | None = None,
        start_from: str | None = None,
        start_options: Mapping[str, Any] | None = None,
        merge_mode: MergeModeOption = "auto",
    ) -> None:
        if not experts:
            raise DivMergeError("No experts given: list them under model.experts as `task_name: path`.")
        get_space(granularity, space_options)
        if init is not None and not math.isfinite(init):
            raise DivMergeError(f"model.init is {init}: give a finite number, or leave it unset for 1/T.")
        if backbone_pass not in ("per_task", "joint"):
            raise DivMergeError(f"backbone_pass must be 'per_task' or 'joint', not {backbone_pass!r}.")
        self.base = base
        self.experts = dict(experts)
        self.held_out = list(held_out or {})
        self.held_out_sources = dict(held_out or {})
        self.granularity = granularity
        self.space_options = dict(space_options or {})
        check_start(start_from, start_options or {})
        self.start_from, self.start_options = start_from, dict(start_options or {})
        if start_from is not None and init is None:
            init = 0.0  # step 0 is the static merge
        self.objective_name = (
            objective if isinstance(objective, str) else getattr(objective, "__name__", "custom")
        )
        self.objective = get_objective(objective) if isinstance(objective, str) else objective
        self.init, self.clamp = init, clamp
        self.task_vector_dtype = task_vector_dtype
        self.backbone_pass = backbone_pass
        self.merge_mode = check_merge_mode(merge_mode, auto=True)  # before loading anything
        self.merge_mode_reason = ""
        self.family_options = dict(family_options or {})
        self.cache_dir = str(cache_dir or default_cache_dir())
        check_writable_dir(Path(self.cache_dir), "model.cache_dir (the teacher cache)")
        self.merged: MergedModel | None = None
        self.expert_set: ExpertSet | None = None
        self.family: ModelFamily | None = None
        self.fingerprint: str | None = None
        self.task_digests: list[str] = []
        self.num_labels: dict[str, int] = {}
        self.teachers: dict[tuple[str, str], Teacher] = {}

    # ------------------------------------------------------------------ building
    @property
    def task_names(self) -> list[str]:
        """Task (expert) names in order."""
        return list(self.experts)

    @property
    def all_tasks(self) -> list[str]:
        """Merged tasks then held-out tasks: the index order of heads in the merged model."""
        return [*self.task_names, *self.held_out]

    def sources(self) -> list[str]:
        """Every model source: base, experts, held-out classifiers."""
        return [self.base, *self.experts.values(), *self.held_out_sources.values()]

    def build(self, mesh: DeviceMesh | None = None, device: torch.device | None = None) -> MergedModel:
        """Load base and experts and create the coefficients (once).

        Args:
            mesh: Ranks to shard the base and task vectors over (``MergedModel.shard``); every rank then
                reads only its share of the experts where they allow it (sharded loading) and calls this
                alike. A model built earlier without a mesh is sharded now. None keeps them whole.
            device: The device training runs on, whose memory ``merge_mode: auto`` weighs (None: this
                machine's RAM).
        """
        if mesh is not None:
            check_shardable(get_space(self.granularity, self.space_options), self.granularity)
            if self.merged is not None and not self.merged.sharded:
                log.warning("the experts were loaded whole before sharding (built before the mesh existed).")
        if self.merged is None:
            dtype = getattr(torch, self.task_vector_dtype)
            family = detect_family(self.experts).from_options(self.family_options)
            if mesh is not None and self.start_from is not None:
                log.warning("every rank reads the experts whole: start_from merges them whole first.")
            load_mesh = mesh if self.start_from is None else None
            experts = load_experts(self.base, self.experts, self.held_out_sources, dtype, family, load_mesh)
            self._attach(experts, family)
        assert self.merged is not None
        if mesh is not None and not self.merged.sharded:
            self.merged.shard(mesh)
            self.release_expert_set()
        if mesh is not None or device is not None:
            self._choose_mode(device)
        return self.merged

    def _choose_mode(self, device: torch.device | None) -> None:
        """Set the merged model's merge mode from ``merge_mode`` (``auto``: ``choose_merge_mode``)."""
        assert self.merged is not None
        numel = sum(math.prod(shape) for shape in self.merged.shapes.values())
        mode, self.merge_mode_reason = choose_merge_mode(
            self.merge_mode, numel, self.merged.sharded, device_memory(device)
        )
        self.merged.merge_mode = mode

    def _attach(self, experts: ExpertSet, family: ModelFamily) -> None:
        """Make ``experts`` this merger's expert set: the merged model, its family and digests."""
        dtype = getattr(torch, self.task_vector_dtype)
        self.expert_set = experts
        self.merged = MergedModel(
            experts,
            self.granularity,
            self.init,
            self.clamp,
            dtype,
            space_options=self.space_options,
        )
        self._choose_mode(None)
        if self.start_from is not None:
            merged = self.merged
            start = static.static_merge(
                self.start_from, dict(merged.base.items()), merged.dense_task_vectors(), **self.start_options
            )
            merged.set_start(start)
        self.family = family
        self.fingerprint = experts.fingerprint
        self.task_digests = experts.task_digests
        self.num_labels = dict(zip(experts.all_tasks, experts.num_labels, strict=True))

    @classmethod
    def from_expert_set(
        cls, experts: ExpertSet, family: ModelFamily | None = None, **settings: Any
    ) -> "Merger":
        """A merger over an expert set that is already loaded (no loading; for benchmarks and subsets).

        Args:
            experts: The expert set (``ExpertSet.family`` names its family).
            family: The family object to use (default: a fresh one of ``experts.family``).
            **settings: Other ``Merger`` arguments (``granularity``, ``objective``, ``init``, ...).

        Returns:
            The merger, built.
        """
        sources = experts.sources
        merger = cls(
            sources.get("base", ""),
            {t: sources.get(t, "") for t in experts.task_names},
            {t: sources.get(t, "") for t in experts.held_out},
            **settings,
        )
        merger._attach(experts, family or FAMILIES[experts.family].from_options(merger.family_options))
        return merger

    @classmethod
    def for_model(cls, merged: MergedModel, family: ModelFamily, **settings: Any) -> "Merger":
        """A merger around an existing merged model (no expert set: no subsets, no fingerprint).

        For measurements that build the merged model themselves (``benchmarks/step_cost.py``).

        Args:
            merged: The merged model.
            family: Its model family.
            **settings: Other ``Merger`` arguments (``objective``, ``backbone_pass``, ...).

        Returns:
            The merger; fill ``teachers`` before calling ``step_loss``.
        """
        merger = cls("", dict.fromkeys(merged.task_names, ""), **settings)
        merger.merged, merger.family = merged, family
        return merger

    def subset(
        self,
        tasks: Sequence[str],
        granularity: Granularity | None = None,
        objective: str | Objective | None = None,
        init: float | None = None,
        space_options: Mapping[str, Any] | None = None,
        start_from: str | None = None,
        start_options: Mapping[str, Any] | None = None,
    ) -> "Merger":
        """A merger of some of this one's experts, sharing the loaded tensors and the loaded teachers.

        Args:
            tasks: Task names, a non-empty subset of ``task_names`` (in the order wanted).
            granularity: Coefficient space of the new merger (default: this one's).
            objective: Its objective, a name in ``OBJECTIVES`` or a per-example function
                (teacher rows, merged logits) -> (B,) (default: this one's).
            init: Initial coefficient value; None means 1/k.
            space_options: Options of the new merger's space (default: this one's when the granularity
                is this one's, else none).
            start_from: A static method the new merger's coefficients start from (default: none).
            start_options: Its options.

        Returns:
            The new merger, built (no loading).
        """
        self.build()
        if self.expert_set is None:
            raise DivMergeError(
                "This merger released its expert set: take subsets before release_expert_set()."
            )
        sub = Merger.from_expert_set(
            self.expert_set.subset(list(tasks)),  # unknown or no tasks fail here
            self.family,
            granularity=granularity or self.granularity,
            space_options=(
                space_options
                if space_options is not None or granularity not in (None, self.granularity)
                else self.space_options
            ),
            start_from=start_from,
            start_options=start_options,
            objective=self.objective if objective is None else objective,
            init=init,
            clamp=self.clamp,
            task_vector_dtype=self.task_vector_dtype,
            backbone_pass=self.backbone_pass,
            merge_mode=self.merge_mode,
            family_options=self.family_options,
            cache_dir=self.cache_dir,
        )
        sub.teachers = {key: value for key, value in self.teachers.items() if key[0] in tasks}
        return sub

    def new_metrics(self) -> nn.ModuleDict:
        """Per task, fresh ``merged`` / ``expert`` / ``reference`` metrics of the experts' family.

        Where the family's metric is a mean of per-row 0/1 scores, each also gets a ``<name>_rows``
        :class:`~divmerge.families.base.RowCorrectness`: the rows behind the bootstrap intervals.
        """
        self.build()
        assert self.family is not None
        names = ("merged", "expert", "reference")
        return nn.ModuleDict(
            {
                task: nn.ModuleDict(
                    {k: self.family.new_metric(task, n) for k in names}
                    | ({k + ROWS: RowCorrectness() for k in names} if self.family.scores_rows(task) else {})
                )
                for task, n in self.num_labels.items()
            }
        )

    # ------------------------------------------------------------------ data and teachers
    def check_task_names(self, names: Sequence[str]) -> None:
        """Refuse data whose tasks are not exactly the experts' (and held-out tasks')."""
        if sorted(names) != sorted(self.all_tasks):
            raise DivMergeError(
                f"Data tasks {list(names)} and experts {self.all_tasks} differ: give every task an "
                "expert under model.experts (or model.held_out) with the same name."
            )

    def check_data(self, data: TaskData) -> None:
        """Refuse data that does not fit the experts: task names, kinds, class counts; bind the tokenizer."""
        self.check_task_names(data.task_names)
        self.build()
        assert self.family is not None
        self.family.check_tasks(data.tasks, self.backbone_pass)
        positions = getattr(self.merged.skeleton(0).config, "max_position_embeddings", None)
        if positions is not None and data.max_length > positions:
            raise DivMergeError(
                f"data.max_length is {data.max_length} but the experts read at most {positions} tokens "
                f"(max_position_embeddings): set data.max_length to {positions} or less."
            )
        self.family.bind(data.tokenizer, self.num_labels[self.task_names[0]])
        for task in self.all_tasks:
            names = data.label_names(task)
            if names is not None and len(names) != self.num_labels[task]:
                raise DivMergeError(
                    f"Task {task!r} has {len(names)} classes {list(names)} but its expert outputs "
                    f"{self.num_labels[task]}: check label_names or the expert."
                )

    def _check_labels(self, task: str, split: str, labels: list[int] | None) -> None:
        if labels and not 0 <= min(labels) <= max(labels) < self.num_labels[task]:
            raise DivMergeError(
                f"Task {task!r} {split} labels span {min(labels)}..{max(labels)} but its expert has "
                f"{self.num_labels[task]} classes: labels must be class ids 0..{self.num_labels[task] - 1}."
            )

    def teacher_paths(self, data: TaskData, splits: Sequence[str]) -> dict[tuple[str, str], Path]:
        """The cache file of every (task, split) to learn or evaluate on (held-out tasks: no unlabelled).

        Args:
            data: The task data (``check_data`` passed).
            splits: Splits wanted, e.g. ``("unlabelled", "val")``.

        Returns:
            (task, split) -> cache path, keyed by the expert's and the data's digests.
        """
        assert self.family is not None
        wanted = [(task, split) for task in self.task_names for split in splits]
        wanted += [(task, split) for task in self.held_out for split in splits if split != "unlabelled"]
        remove_stale_temporaries(self.cache_dir)
        paths = {}
        for task, split in wanted:
            ds = data.dataset(task, split)
            self._check_labels(task, split, ds.labels)
            digest = ds.digest() + self.family.teacher_key(split)
            t = self.all_tasks.index(task)
            paths[task, split] = cache_path(self.cache_dir, task, split, self.task_digests[t], digest)
        return paths

    @torch.no_grad()
    def compute_teacher(
        self,
        data: TaskData,
        task: str,
        split: str,
        device: torch.device,
        rows: TaskDataset | None = None,
    ) -> Teacher | None:
        """Expert outputs on one task split: the merged model with one-hot coefficients.

        ``rows`` restricts it to those inputs of the split (a rank's share; rows in their order); an
        empty share returns None after the expert's merge (sharded, a collective every rank joins).

        For a held-out task the "expert" is the base backbone (all-zero coefficients) with its head. A
        space whose one-hot coefficients do not reproduce the experts (``svd`` at a rank below full)
        reads them from an exact layer-wise model of the same expert set, so the cache holds the experts.
        """
        merged = self.build()
        assert self.family is not None
        if not merged.coefficients.space.exact:
            if self.expert_set is None:
                raise DivMergeError(
                    f"Teachers of {task}/{split} are not cached and the dense task vectors were released "
                    "after the first teachers were built: run this in a fresh process."
                )
            merged = MergedModel(self.expert_set, "layer").to(device)
        t = self.all_tasks.index(task)
        table = merged.one_hot_table(t) if task in self.task_names else merged.base_table()
        if rows is not None and not len(rows):
            merged.eval_params(table.to(device))
            return None
        loader = data.eval_loader(task, split)  # type: ignore[arg-type]
        if rows is not None:
            loader = DataLoader(rows, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
        size = len(loader.dataset)  # type: ignore[arg-type]
        return self.family.teacher(merged, t, table.to(device), loader, size, split)

    @property
    def holds_two_copies(self) -> bool:
        """Whether the expert set's dense task vectors are a second copy beside the merged model's.

        True for a space that stores its own form of them (e.g. ``svd``'s factors) or this rank's
        shard of them, until ``release_expert_set``.
        """
        merged = self.build()
        if self.expert_set is None:
            return False
        return any(
            not isinstance(stored := merged.task_vectors[n], Tensor)
            or (stored is not t and stored.data_ptr() != t.data_ptr())
            for n, t in self.expert_set.task_vectors.items()
        )

    def release_expert_set(self) -> None:
        """Drop the loaded expert set where it is a second copy of the task vectors.

        Only where ``holds_two_copies``: memory then holds the space's storage alone. Call after every
        teacher this process needs is cached; ``subset`` is not available afterwards.
        """
        if self.holds_two_copies:
            self.expert_set = None

    def build_teachers(
        self,
        data: TaskData,
        paths: Mapping[tuple[str, str], Path],
        device: torch.device,
        mesh: DeviceMesh | None = None,
    ) -> list:
        """Compute every missing cache file; returns the (task, split, path) built.

        Args:
            data: The task data.
            paths: (task, split) -> cache file (``teacher_paths``).
            device: Where to run the experts.
            mesh: None: call on one rank, which builds every file. A mesh: every rank of it calls this
                alike (the merged model is sharded over it); each decodes its share of each split's inputs
                and rank 0 writes the joined file (``build_teacher_shares``).
        """
        if mesh is not None:
            return self.build_teacher_shares(data, paths, device, mesh)
        built = []
        for (task, split), path in paths.items():
            if len(data.dataset(task, split)):  # type: ignore[arg-type]
                _, new = get_or_compute(
                    path,
                    lambda task=task, split=split: self.compute_teacher(data, task, split, device),
                    len(data.dataset(task, split)),  # type: ignore[arg-type]
                )
                if new:
                    built.append((task, split, path))
        return built

    def build_teacher_shares(
        self, data: TaskData, paths: Mapping[tuple[str, str], Path], device: torch.device, mesh: DeviceMesh
    ) -> list:
        """Every rank of ``mesh`` computes its share of each missing cache file; rank 0 joins and writes it.

        Rank r decodes the contiguous rows ``column_range(N, r, world)`` of a split of N inputs; the
        shares are gathered on rank 0 in rank order, joined by the family (``join_teachers``: padded to the
        longest answer as one process would) and written atomically, so the file equals a one-process
        build. Which files are missing is decided on rank 0 (the cache directory must be shared). Shares
        take different numbers of forwards; per block, where each forward is a collective, the ranks keep
        in step through ``MergedModel.announce`` / ``drain``.
        """
        assert self.family is not None
        group, rank, world = mesh.get_group(), mesh.get_local_rank(), mesh.size()
        first = dist.get_global_rank(group, 0)
        sizes = {k: len(data.dataset(*k)) for k in paths}  # type: ignore[arg-type]
        missing = [[k for k, path in paths.items() if sizes[k] and load_cached(path, sizes[k]) is None]]
        dist.broadcast_object_list(missing, src=first, group=group)
        built = []
        for task, split in missing[0]:
            dataset = data.dataset(task, split)  # type: ignore[arg-type]
            lo, hi = column_range(len(dataset), rank, world)
            labels = None if dataset.labels is None else dataset.labels[lo:hi]
            share = TaskDataset(dataset.encodings[lo:hi], labels)
            part = self.compute_teacher(data, task, split, device, share)  # None for no rows
            self.drain()  # per block, this rank stands in for the forwards of ranks still decoding
            parts: list = [None] * world if rank == 0 else []
            dist.gather_object(part, parts if rank == 0 else None, dst=first, group=group)
            if rank == 0:
                joined = self.family.join_teachers([p for p in parts if p is not None])
                save_atomic(joined, paths[task, split])
            built.append((task, split, paths[task, split]))
        return built

    def load_teachers(self, data: TaskData, paths: Mapping[tuple[str, str], Path]) -> None:
        """Read the cached teachers of ``paths`` (every rank), refusing a cache this rank cannot see."""
        for key, path in paths.items():
            if len(data.dataset(*key)):  # type: ignore[arg-type]
                cached = load_cached(path, len(data.dataset(*key)))  # type: ignore[arg-type]
                if cached is None:
                    raise DivMergeError(
                        f"Teacher cache {path} is missing on this rank: use a shared cache_dir."
                    )
                self.teachers[key] = cached

    # ------------------------------------------------------------------ training
    def step_loss(
        self,
        batch: Mapping[str, Mapping[str, Tensor]],
        split: str = "unlabelled",
        params: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum over tasks of the mean divergence between expert (cached) and merged outputs.

        Args:
            batch: Task name -> its collated batch of ``split`` (``input_ids``, ``attention_mask``, ``idx``);
                held-out tasks are skipped (evaluation only).
            split: Whose teacher rows ``idx`` index (``unlabelled`` in training).
            params: Merged tensors to score (evaluation); None: ``step_params()``, differentiable.

        Returns:
            The loss to call ``backward()`` on, and each task's detached loss by task name.
        """
        merged = self.build()
        assert self.family is not None
        batch = {task: b for task, b in batch.items() if task in self.experts}
        index = {task: self.task_names.index(task) for task in batch}
        teachers = {
            index[task]: self.family.teacher_rows(self.teachers[task, split], b["idx"].cpu())
            for task, b in batch.items()
        }  # task -> the batch's rows of its teacher cache
        inputs = {index[task]: b for task, b in batch.items()}
        loss, per_task = self.family.step_loss(
            merged, self.objective, inputs, teachers, self.backbone_pass, params
        )
        return loss, {task: per_task[index[task]] for task in batch}

    @torch.no_grad()
    def divergence(
        self,
        batch: Mapping[str, Mapping[str, Tensor]],
        split: str,
        params: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Per task, the mean divergence of the merged model on a batch, without gradients.

        The label-free selection signal: the training objective on inputs held out of training.

        Args:
            batch: Task name -> its collated batch of ``split`` (with ``idx`` into that split's teachers).
            split: Whose teacher rows ``idx`` index; they must hold distributions (``unlabelled`` always
                does; classification experts' ``val`` too).
            params: The evaluation's merged tensors (``learned_params(whole=False)``): no merge per
                batch (sharded, a merge is a collective that ranks with fewer batches would not join).
                None merges the learned coefficients.

        Returns:
            Task name -> its mean divergence (a 0-d tensor).
        """
        return self.step_loss(batch, split, params)[1]

    def drain(self) -> None:
        """End an evaluation phase on every rank (see ``MergedModel.drain``; nothing when not sharded)."""
        merged = self.build()
        assert self.family is not None
        family = self.family
        merged.drain(lambda params: family.probe(merged, params))

    # ------------------------------------------------------------------ merged tensors
    def static_params(self, method: str, options: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """Merged backbone tensors of a static merge (LoRA adapters densified), named as ``merged_params``."""
        merged = self.build()
        out = static.static_merge(
            method, dict(merged.base.items()), merged.dense_task_vectors(), **dict(options or {})
        )
        return {merged.full_name(name): tensor for name, tensor in out.items()}

    def learned_params(self, table: Tensor | None = None, whole: bool = True) -> dict[str, Tensor]:
        """Detached merged tensors of the learned coefficients (or of ``table``).

        Args:
            table: Coefficients (T, G); None: the learned ones.
            whole: Every tensor merged (export, static comparisons); False: for evaluation forwards
                (``MergedModel.eval_params``: per block in the per-block mode, sharded or not).
        """
        merged = self.build()
        with torch.no_grad():
            params = merged.merged_params(table) if whole else merged.eval_params(table)
            return {k: v.detach() for k, v in params.items()}

    def params(
        self, method: str, options: Mapping[str, Any] | None = None, whole: bool = True
    ) -> dict[str, Tensor]:
        """The merged tensors of ``method``: the learned coefficients (``divmerge``) or a static merge.

        ``whole=False`` gives a learned merge in the model's merge mode (``learned_params``).
        """
        if method == LEARNED:
            return self.learned_params(whole=whole)
        return self.static_params(method, options)

    def reference_params(
        self, method: str, options: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor] | None:
        """A reference merge's tensors (None where sharded task vectors cannot give them).

        With sharded task vectors only the linear references (``task_arithmetic``, ``average``) are
        computed, through the sharded merge with constant coefficients.
        """
        merged = self.build()
        if not merged.sharded:
            return self.static_params(method, options)
        constant = {
            "task_arithmetic": float((options or {}).get("lambda_", static.TA_LAMBDA)),
            "average": 1 / len(self.task_names),
        }
        if method not in constant:
            return None
        return self.learned_params(merged.constant_table(constant[method]), whole=False)

    # ------------------------------------------------------------------ evaluation
    def eval_update(
        self,
        metrics: Mapping[str, Any],
        task: str,
        split: str,
        batch: Mapping[str, Tensor],
        params: Mapping[str, Mapping[str, Tensor]],
        rows: Rows,
    ) -> None:
        """Score one evaluation batch of ``task`` with the merged (and reference) tensors and the expert.

        Args:
            metrics: The task's ``merged`` / ``expert`` / ``reference`` metrics (``new_metrics()[task]``).
            task: Task name.
            split: ``val`` or ``test``.
            batch: Collated batch (``input_ids``, ``attention_mask``, ``idx``, ``labels``).
            params: ``merged`` (and optionally ``reference``) merged tensors.
            rows: The task split's rows.
        """
        merged = self.build()
        assert self.family is not None
        teacher = self.family.teacher_rows(self.teachers[task, split], batch["idx"].cpu())
        self.family.eval_update(merged, self.all_tasks.index(task), metrics, batch, params, teacher, rows)

    def evaluate(
        self,
        batches: Mapping[str, Iterable[Mapping[str, Tensor]]],
        split: str,
        params: Mapping[str, Mapping[str, Tensor]],
        rows: Mapping[str, Rows] | None = None,
        correct: dict[str, dict[str, Tensor]] | None = None,
    ) -> dict[str, dict[str, float]]:
        """Score whole task splits outside Lightning: per task, ``merged`` / ``expert`` (/ ``reference``).

        Args:
            batches: Task -> its collated batches of ``split`` (any order; each example once).
            split: ``val`` or ``test`` (teachers of that split loaded).
            params: ``merged`` (and optionally ``reference``) merged tensors.
            rows: Task -> the split's rows (needed by families that score generated text).
            correct: When given, filled with task -> name -> each row's 0/1 correctness (N,) uint8 in
                row order, for the tasks whose metric is a mean of per-row scores (bootstrap intervals).

        Returns:
            Task -> metric name -> value.
        """
        metrics = self.new_metrics()
        out = {}
        empty = Rows([], None, None)
        with torch.no_grad():
            for task, task_batches in batches.items():
                for batch in task_batches:
                    self.eval_update(metrics[task], task, split, batch, params, (rows or {}).get(task, empty))
                names = ["expert", *params]
                out[task] = {name: float(metrics[task][name].compute()) for name in names}
                if correct is not None and "expert" + ROWS in metrics[task]:
                    correct[task] = {name: metrics[task][name + ROWS].compute() for name in names}
        self.drain()  # sharded per block: every rank calls this; the ones done early stand in
        return out

    def describe(self, method: str) -> str:
        """The merge method in words, e.g. ``layer-wise js merge`` or ``static ties merge``."""
        if method != LEARNED:
            return f"static {method} merge"
        start = f" from {self.start_from}" if self.start_from else ""
        return f"{self.granularity}-wise {self.objective_name} merge{start}"
