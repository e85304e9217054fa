"""Load a base model and its fine-tuned experts; validate them; compute task vectors once.

An expert is a Hugging Face sequence-classification model fine-tuned from the base. Its backbone
(``model.base_model``, e.g. ``bert.*``) is merged; everything else (the classification head) stays the
expert's own. Task vectors tau_t = theta_t - theta_0 are stacked per tensor, shape (T, *shape), so a
merge is one weighted sum per tensor.

The expert modules themselves are kept on the ``meta`` device (no memory): they only provide the
forward code for ``torch.func.functional_call``.
"""

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel

from divmerge.adapters import ADAPTER_CONFIG, is_adapter, load_adapter
from divmerge.errors import DivMergeError
from divmerge.lora import LoraStack

_LOCAL_PREFIXES = ("/", "./", "../", "~")
ZOO_PREFIX = "zoo:"


def resolve_source(source: str, build: bool = False) -> str:
    """Turn a config source into something ``from_pretrained`` loads.

    Args:
        source: A local directory (a model or a peft adapter), a hub id, ``zoo:minilm`` (the packaged
            demo base), ``zoo:<task>`` (the demo expert for that task) or ``zoo:lora/<task>`` (its LoRA
            adapter twin).
        build: For ``zoo:<task>``, fine-tune the demo expert if it is not cached yet.

    Returns:
        A local path or hub id.

    """
    if source.startswith(ZOO_PREFIX):
        from divmerge import zoo

        name = source[len(ZOO_PREFIX) :]
        if name == "minilm":
            return str(zoo.base_model_path())
        task, recipe = zoo.demo_expert(name)
        zoo.load_demo_task(task)  # unknown names fail here with the list of valid ones
        path = zoo.build_expert(task, recipe) if build else zoo.expert_dir(task, recipe)
        if not Path(path).is_dir():
            raise DivMergeError(
                f"Demo expert {source!r} is not built yet: run `python train.py fit` once (its "
                "prepare_data step builds it) or call divmerge.zoo.build_expert."
            )
        return str(path)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not ((path / "config.json").is_file() or is_adapter(path)):
            raise DivMergeError(
                f"{source!r} is not a Hugging Face model or peft adapter directory (no config.json or "
                f"{ADAPTER_CONFIG}): point to the folder written by save_pretrained."
            )
        return str(path)
    if source.startswith(_LOCAL_PREFIXES) or os.sep in source.strip(os.sep).replace("/", "", 1):
        raise DivMergeError(f"Model directory {source!r} does not exist: fix the path in the config.")
    return source  # a hub id


def _load(loader: type, source: str, what: str) -> PreTrainedModel:
    """Load a model with clear errors instead of transformers' tracebacks."""
    try:
        return loader.from_pretrained(resolve_source(source), dtype=torch.float32)
    except DivMergeError:
        raise
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DivMergeError(
            f"Could not load {what} from {source!r} ({first}): give a local model directory, or a hub id "
            "with network access (unset HF_HUB_OFFLINE)."
        ) from err


def tensor_digest(tensor: Tensor, samples: int = 1024) -> str:
    """A cheap content hash: shape, dtype, an evenly strided sample of values and their float64 sum."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    sample = flat[::step][:samples].to(torch.float64).cpu()
    h = hashlib.sha256(f"{tuple(tensor.shape)}|{tensor.dtype}|{flat.double().sum().item():.10e}".encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ExpertSet:
    """A base model and T experts, reduced to what merging needs.

    Attributes:
        task_names: Expert (task) names, in order; index t everywhere below.
        names: Backbone tensor names that are merged (relative to the backbone).
        base: theta_0 per merged tensor.
        task_vectors: tau per merged tensor, stacked over tasks: (T, *shape); when some experts are LoRA
            adapters, only over the tasks ``dense_rows[name]`` (their all-zero rows are not stored).
        buffers: The base backbone's buffers (position ids, ...), shared by every task.
        heads: Per task, the expert's own (unmerged) tensors, by full name.
        skeletons: Per task, the expert's module on the meta device (forward code only).
        prefix: The backbone's attribute name inside an expert (``bert`` for BERT).
        num_labels: Per task, the size of the expert's output.
        fingerprint: Hash of names, shapes and sampled content of base and experts.
        task_digests: Per task, the same hash for base + that expert alone (keys its teacher cache).
        held_out: Held-out tasks: evaluated with their own head on the merged backbone, not merged;
            their heads, skeletons, num_labels and digests follow the experts' in those lists.
        sources: Where base and experts were loaded from.
        dense_rows: The task of each row of ``task_vectors[name]``; empty when every expert is a full
            fine-tune (rows are then the T tasks in order).
        lora: Per backbone module with plain LoRA adapters, their factors stacked along the rank
            (``divmerge.lora``); that module's ``weight`` coefficients scale them.
        generative: Causal-LM experts (``divmerge.causal_lm``): every weight is merged (``prefix`` is
            empty, ``names`` are full parameter names), there are no heads and ``num_labels`` is the
            vocabulary size.

    """

    task_names: list[str]
    names: list[str]
    base: dict[str, Tensor]
    task_vectors: dict[str, Tensor]
    buffers: dict[str, Tensor]
    heads: list[dict[str, Tensor]]
    skeletons: list[nn.Module]
    prefix: str
    num_labels: list[int]
    fingerprint: str
    task_digests: list[str] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    dense_rows: dict[str, list[int]] = field(default_factory=dict)
    lora: dict[str, LoraStack] = field(default_factory=dict)
    generative: bool = False

    @property
    def num_tasks(self) -> int:
        """Number of experts T."""
        return len(self.task_names)

    @property
    def all_tasks(self) -> list[str]:
        """Merged tasks, then held-out tasks: the index order of heads, skeletons and num_labels."""
        return [*self.task_names, *self.held_out]

    def subset(self, tasks: Sequence[str]) -> "ExpertSet":
        """The same base with only ``tasks``' experts (task vectors sliced, in the given order).

        Args:
            tasks: Task names, a subset of ``task_names``.

        Returns:
            A new ExpertSet; the fingerprint covers the subset.
        """
        unknown = [t for t in tasks if t not in self.task_names]
        if unknown or not tasks:
            raise DivMergeError(
                f"Tasks {unknown or list(tasks)} are not a non-empty subset of {self.task_names}."
            )
        idx = [self.task_names.index(t) for t in tasks]
        digest = hashlib.sha256("|".join(self.task_digests[i] for i in idx).encode()).hexdigest()[:16]
        task_vectors, dense_rows = {}, {}
        for n, tau in self.task_vectors.items():
            if n not in self.dense_rows:
                task_vectors[n] = tau[idx]  # (k, *shape)
                continue
            kept = [(i, self.dense_rows[n].index(t)) for i, t in enumerate(idx) if t in self.dense_rows[n]]
            task_vectors[n] = tau[[row for _, row in kept]]  # (k', *shape)
            dense_rows[n] = [i for i, _ in kept]
        lora = {m: kept for m, stack in self.lora.items() if (kept := stack.select(idx)) is not None}
        return ExpertSet(
            task_names=list(tasks),
            names=list(self.names),
            base=self.base,
            task_vectors=task_vectors,
            buffers=self.buffers,
            heads=[self.heads[i] for i in idx],
            skeletons=[self.skeletons[i] for i in idx],
            prefix=self.prefix,
            num_labels=[self.num_labels[i] for i in idx],
            fingerprint=digest,
            task_digests=[self.task_digests[i] for i in idx],
            sources={"base": self.sources.get("base", ""), **{t: self.sources.get(t, "") for t in tasks}},
            dense_rows=dense_rows,
            lora=lora,
            generative=self.generative,
        )


def _split_expert(
    task: str, model: PreTrainedModel, base: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split an expert's parameters into (backbone, head) and check the backbone matches the base."""
    prefix = model.base_model_prefix
    backbone, head = {}, {}
    for name, param in model.named_parameters():
        if name.startswith(prefix + "."):
            short = name[len(prefix) + 1 :]
            if short not in base:
                raise DivMergeError(
                    f"Expert {task!r} has tensor {name!r} that the base model lacks: the expert was not "
                    "fine-tuned from this base; use the base it was trained from."
                )
            if tuple(param.shape) != tuple(base[short].shape):
                raise DivMergeError(
                    f"Expert {task!r} tensor {name!r} has shape {tuple(param.shape)} but the base has "
                    f"{tuple(base[short].shape)}: experts must share the base's architecture "
                    "(same config, vocabulary and sizes)."
                )
            backbone[short] = param.detach()
        else:
            head[name] = param.detach()
    return backbone, head


def load_experts(
    base: str,
    experts: Mapping[str, str],
    held_out: Mapping[str, str] | None = None,
    task_vector_dtype: torch.dtype | None = None,
) -> ExpertSet:
    """Load the base and every expert, validate them and compute stacked task vectors.

    Experts are loaded one at a time, so peak memory is base + task vectors + one expert. An expert may be
    a peft LoRA adapter directory over ``base`` (see ``divmerge.adapters``): its plain LoRA factors are
    kept stacked in ``lora`` (adapter-sized) and only its other, densified changes get task-vector rows.
    When an expert is a causal LM (by its config, or a peft adapter with task_type CAUSAL_LM),
    ``divmerge.causal_lm.load_causal_lm_experts`` loads the set instead.

    Args:
        base: Source of the pretrained base model (see ``resolve_source``).
        experts: Task name -> expert source (a full fine-tune or a LoRA adapter), in task order.
        held_out: Task name -> classifier whose HEAD evaluates a held-out task (its backbone is not
            merged); listed after the experts in ``heads`` / ``skeletons`` / ``num_labels``.
        task_vector_dtype: Dtype the stacked task vectors are stored in (each tau_t is computed in the
            base's dtype, then rounded into the stack: a bf16 stack never holds a float32 copy); None
            keeps the base's dtype.

    Returns:
        The expert set.

    """
    if not experts:
        raise DivMergeError("No experts given: list them under model.experts as `task_name: path`.")
    from divmerge import causal_lm  # imports this module

    if any(causal_lm.is_causal_lm(source) for source in experts.values()):
        return causal_lm.load_causal_lm_experts(base, experts, held_out)
    base_model = _load(AutoModel, base, "the base model")
    theta0 = {n: p.detach() for n, p in base_model.named_parameters()}
    base_buffers = {n: b.detach() for n, b in base_model.named_buffers()}
    base_type = base_model.config.model_type
    digest = hashlib.sha256()
    task_names = list(experts)
    held_out = dict(held_out or {})
    clash = sorted(set(task_names) & set(held_out))
    if clash:
        raise DivMergeError(f"Tasks {clash} are both experts and held out: list each task in one of them.")
    sources = {**dict(experts), **held_out}
    paths = {task: resolve_source(source) for task, source in sources.items()}
    full = [t for t, task in enumerate(task_names) if not is_adapter(paths[task])]  # stored rows
    adapter_rows: dict[str, list[tuple[int, Tensor]]] = {}  # adapters' densified changes: (task, tau)
    lora_parts: dict[str, list[tuple[int, Tensor, Tensor]]] = {}  # module -> (task, A, s * B)
    names: list[str] | None = None
    stacked: dict[str, Tensor] = {}
    heads, skeletons, num_labels, prefix = [], [], [], ""
    expert_digests = []
    for t, task in enumerate([*task_names, *held_out]):
        if is_adapter(paths[task]):
            model, factors = load_adapter(task, paths[task], resolve_source(base), base, base_model)
        else:
            model, factors = _load(AutoModelForSequenceClassification, sources[task], f"expert {task!r}"), {}
        if model.config.model_type != base_type:
            raise DivMergeError(
                f"Expert {task!r} is a {model.config.model_type!r} model but the base is {base_type!r}: "
                "every expert must be fine-tuned from the configured base."
            )
        _check_vocabulary(task, model, base_model)
        backbone, head = _split_expert(task, model, theta0)
        if names is None:
            names = [n for n in theta0 if n in backbone and theta0[n].is_floating_point()]
            prefix = model.base_model_prefix
            stacked = {
                n: theta0[n].new_empty((len(full), *theta0[n].shape), dtype=task_vector_dtype) for n in names
            }
        else:
            differing = sorted(set(names) ^ {n for n, v in backbone.items() if v.is_floating_point()})
            if differing:
                raise DivMergeError(
                    f"Expert {task!r} and expert {task_names[0]!r} differ in backbone tensor "
                    f"{prefix}.{differing[0]}: experts must share one architecture."
                )
        merged_task = t < len(task_names)
        if merged_task and t in full:
            for n in names:
                torch.sub(backbone[n], theta0[n], out=stacked[n][full.index(t)])  # tau_t: (*shape)
        elif merged_task:
            add_adapter_changes(t, backbone, {n: theta0[n] for n in names}, factors, adapter_rows, lora_parts)
        heads.append({k: v.clone() for k, v in head.items()})
        num_labels.append(int(model.config.num_labels))
        one = hashlib.sha256(
            f"{model.config.model_type}|{'merged' if merged_task else 'held-out head'}|".encode()
        )
        for n in names if merged_task else []:  # a held-out classifier contributes its head only
            one.update(f"{n}:{tensor_digest(backbone[n])}|".encode())
        if merged_task:
            one.update(factors_digest(factors).encode())
        for n, v in head.items():
            one.update(f"{n}:{tensor_digest(v)}|".encode())
        expert_digests.append(one.hexdigest())
        digest.update(f"{task}|{one.hexdigest()}|".encode())
        model.requires_grad_(False).to("meta").eval()
        skeletons.append(model)
    assert names is not None
    dense_rows = append_adapter_rows(stacked, full, adapter_rows) if len(full) < len(task_names) else {}
    base_digest = hashlib.sha256()
    for n in names:
        base_digest.update(f"{n}:{tensor_digest(theta0[n])}|".encode())
    digest.update(base_digest.digest())
    task_digests = [
        hashlib.sha256(f"{base_digest.hexdigest()}|{d}".encode()).hexdigest()[:16] for d in expert_digests
    ]
    return ExpertSet(
        task_names=task_names,
        names=names,
        base={n: theta0[n] for n in names},
        task_vectors=stacked,
        buffers=base_buffers,
        heads=heads,
        skeletons=skeletons,
        prefix=prefix,
        num_labels=num_labels,
        fingerprint=digest.hexdigest()[:16],
        task_digests=task_digests,
        sources={"base": base, **sources},
        held_out=list(held_out),
        dense_rows=dense_rows,
        lora={m: stack_lora(parts) for m, parts in lora_parts.items()},
    )


def add_adapter_changes(
    task: int,
    params: Mapping[str, Tensor],
    theta0: Mapping[str, Tensor],
    factors: Mapping[str, tuple[Tensor, Tensor]],
    dense_parts: dict[str, list[tuple[int, Tensor]]],
    lora_parts: dict[str, list[tuple[int, Tensor, Tensor]]],
) -> None:
    """Record what adapter expert ``task`` changes: densified tensors and plain LoRA factors.

    Args:
        task: The adapter expert's task index.
        params: Its merged tensors (adapter applied, plain LoRA layers removed), by ``theta0``'s names.
        theta0: The base's merged tensors.
        factors: Its plain LoRA factors: module -> (A (r, in), s * B (out, r)).
        dense_parts: Name -> (task, tau (*shape)), appended to for each tensor the adapter changed.
        lora_parts: Module -> (task, A, s * B), appended to for each factored module.
    """
    for n, base in theta0.items():
        if not torch.equal(params[n], base):
            dense_parts.setdefault(n, []).append((task, params[n] - base))  # (*shape)
    for m, (a, b) in factors.items():
        lora_parts.setdefault(m, []).append((task, a, b))


def append_adapter_rows(
    stacked: dict[str, Tensor], full: list[int], dense_parts: Mapping[str, list[tuple[int, Tensor]]]
) -> dict[str, list[int]]:
    """Append the adapters' few densified task-vector rows to the full experts' stacks, in place.

    Args:
        stacked: Name -> the full experts' task vectors (len(full), *shape); rows are appended.
        full: Task index of each full expert (the stacks' rows, in order).
        dense_parts: Name -> (task, tau (*shape)) of the adapters that changed that tensor.

    Returns:
        ``ExpertSet.dense_rows``: per name, the task of each row of its stack.
    """
    dense_rows = {}
    for n in stacked:
        extra = dense_parts.get(n, [])
        if extra:
            rows = torch.stack([tau for _, tau in extra]).to(stacked[n].dtype)  # (extra, *shape)
            stacked[n] = torch.cat([stacked[n], rows])  # (len(full) + extra, *shape)
        dense_rows[n] = full + [t for t, _ in extra]
    return dense_rows


def factors_digest(factors: Mapping[str, tuple[Tensor, Tensor]]) -> str:
    """The part of an expert's digest that covers its plain LoRA factors (empty without any)."""
    return "".join(
        f"{m}@lora:{tensor_digest(a)}:{tensor_digest(b)}|" for m, (a, b) in sorted(factors.items())
    )


def stack_lora(parts: Sequence[tuple[int, Tensor, Tensor]]) -> LoraStack:
    """Stack (task, A (r_t, in), s_t * B_t (out, r_t)) of several adapters along the rank."""
    return LoraStack(
        a=torch.cat([a for _, a, _ in parts]),  # (R, in)
        b=torch.cat([b for _, _, b in parts], dim=1),  # (out, R)
        task=torch.cat([torch.full((a.shape[0],), t, dtype=torch.long) for t, a, _ in parts]),  # (R,)
    )


def _check_vocabulary(task: str, model: PreTrainedModel, base: PreTrainedModel) -> None:
    """Refuse an expert whose token embeddings were resized away from the base vocabulary."""
    embeddings = model.get_input_embeddings().weight
    ours, theirs = embeddings.shape[0], base.get_input_embeddings().weight.shape[0]
    if ours != theirs:
        name = next(n for n, p in model.named_parameters() if p is embeddings)
        raise DivMergeError(
            f"Expert {task!r} has a vocabulary of {ours} tokens ({name}) but the base has {theirs}: its "
            "tokenizer differs from the base's (e.g. tokens were added and the embeddings resized when "
            "fine-tuning), so its tensors do not line up; use experts fine-tuned with the base's tokenizer, "
            "or configure as model.base the base resized to that same vocabulary (all experts must share it)."
        )
