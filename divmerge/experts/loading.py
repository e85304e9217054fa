"""ONE loader loop for every model family: base + experts -> an ``ExpertSet`` with stacked task vectors.

The loop is family-agnostic: a model family (``divmerge.families``) passes an
:class:`~divmerge.experts.kind.ExpertKind` that says how to load its models and which of an expert's
tensors are merged. Experts are loaded one at a time, so peak memory is base + task vectors + one
expert. An expert may be a peft LoRA adapter directory over the base (``divmerge.experts.adapters``):
its plain LoRA factors are kept stacked (adapter-sized) and only its other, densified changes get
task-vector rows (``dense_rows``).
"""

import logging
from collections.abc import Mapping

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from divmerge.core.digest import entry, factors_digest, model_digest, set_fingerprint, tensor_digest
from divmerge.core.expert_set import ExpertSet
from divmerge.core.lora import stack_lora
from divmerge.errors import DivMergeError
from divmerge.experts.adapters import is_adapter, load_adapter
from divmerge.experts.finite import check_finite, factor_tensors
from divmerge.experts.kind import ExpertKind
from divmerge.experts.sharded_loading import load_sharded, sharded_refusal
from divmerge.experts.sources import load_pretrained, resolve_source

log = logging.getLogger(__name__)


def load_expert_set(
    kind: ExpertKind,
    base: str,
    experts: Mapping[str, str],
    held_out: Mapping[str, str] | None = None,
    task_vector_dtype: torch.dtype | None = None,
    mesh: DeviceMesh | None = None,
) -> ExpertSet:
    """Load the base and every expert, validate them and compute stacked task vectors.

    Args:
        kind: The model family's loading rules.
        base: Source of the pretrained base model (see ``resolve_source``).
        experts: Task name -> expert source (a full fine-tune or a LoRA adapter), in task order.
        held_out: Task name -> classifier whose HEAD evaluates a held-out task (its merged part is not
            merged); listed after the experts in ``heads`` / ``skeletons`` / ``num_labels``.
        task_vector_dtype: Dtype the stacked task vectors are stored in (each tau_t is computed in the
            base's dtype, then rounded into the stack: a bf16 stack never holds a float32 copy); None
            keeps the base's dtype.
        mesh: Ranks that will shard the base and task vectors (``divmerge.core.sharding``): each then
            reads only its columns (``divmerge.experts.sharded_loading``) where the experts allow it, and
            otherwise loads them whole (a warning says why); a collective then. None loads them whole.

    Returns:
        The expert set.

    """
    if not experts:
        raise DivMergeError("No experts given: list them under model.experts as `task_name: path`.")
    held_out = dict(held_out or {})
    task_names = list(experts)
    clash = sorted(set(task_names) & set(held_out))
    if clash:
        raise DivMergeError(f"Tasks {clash} are both experts and held out: list each task in one of them.")
    kind.check_sources(base, experts, held_out)
    if mesh is not None:
        paths = {"base": resolve_source(base), **{t: resolve_source(s) for t, s in experts.items()}}
        reason = sharded_refusal(kind, paths, held_out)
        if reason is None:
            return load_sharded(kind, {"base": base, **experts}, paths, mesh, task_vector_dtype)
        log.warning("every rank reads the experts whole: %s.", reason)
    base_model = load_pretrained(kind.base_class, base, "the base model")
    check_finite(f"The base model {base!r}", base_model.named_parameters())
    kind.extend_base(base_model)
    theta0 = {n: p.detach() for n, p in base_model.named_parameters()}  # tied tensors appear once
    base_type = base_model.config.model_type
    sources = {**dict(experts), **held_out}
    paths = {task: resolve_source(source) for task, source in sources.items()}
    full = [t for t, task in enumerate(task_names) if not is_adapter(paths[task])]  # stored rows
    adapter_rows: dict[str, list[tuple[int, Tensor]]] = {}  # adapters' densified changes: (task, tau)
    lora_parts: dict[str, list[tuple[int, Tensor, Tensor]]] = {}  # module -> (task, A, s * B)
    names: list[str] | None = None
    stacked: dict[str, Tensor] = {}
    heads, skeletons, num_labels, prefix, expert_digests = [], [], [], "", []
    for t, task in enumerate([*task_names, *held_out]):
        if is_adapter(paths[task]):
            model, factors = load_adapter(
                task, paths[task], resolve_source(base), base, base_model, kind.adapter_task_type
            )
        else:
            model = load_pretrained(
                kind.expert_class, sources[task], f"expert {task!r}", kind.complete_experts
            )
            factors = {}
        what = f"{'Expert' if t < len(task_names) else 'Held-out classifier'} {task!r}"
        check_finite(what, model.named_parameters())  # a LoRA adapter: with its densified updates
        check_finite(what, factor_tensors(factors))
        if model.config.model_type != base_type:
            raise DivMergeError(
                f"Expert {task!r} is a {model.config.model_type!r} model but the base is {base_type!r}: "
                "every expert must be fine-tuned from the configured base."
            )
        merged_part, own = kind.split(task, model, base_model, theta0)
        if names is None:
            names = [n for n in theta0 if n in merged_part and theta0[n].is_floating_point()]
            prefix = kind.prefix(model)
            stacked = {
                n: theta0[n].new_empty((len(full), *theta0[n].shape), dtype=task_vector_dtype) for n in names
            }
        else:
            differing = sorted(set(names) ^ {n for n, v in merged_part.items() if v.is_floating_point()})
            if differing:
                raise DivMergeError(
                    f"Expert {task!r} and expert {task_names[0]!r} differ in backbone tensor "
                    f"{prefix}.{differing[0]}: experts must share one architecture."
                )
        merged_task = t < len(task_names)
        if merged_task and t in full:
            for n in names:
                torch.sub(merged_part[n], theta0[n], out=stacked[n][full.index(t)])  # tau_t: (*shape)
        elif merged_task:
            add_adapter_changes(
                t, merged_part, {n: theta0[n] for n in names}, factors, adapter_rows, lora_parts
            )
        heads.append({k: v.clone() for k, v in own.items()})
        num_labels.append(kind.num_outputs(model))
        header = f"{model.config.model_type}|{kind.digest_tag if merged_task else 'held-out head'}|"
        lines = [entry(n, tensor_digest(merged_part[n])) for n in names] if merged_task else []
        lines += [factors_digest(factors)] if merged_task else []  # a held-out one: its head only
        lines += [entry(n, tensor_digest(v)) for n, v in own.items()]
        expert_digests.append(model_digest(header, lines))
        kind.to_skeleton(model)
        skeletons.append(model)
    assert names is not None
    kind.complete(task_names, full, {n: theta0[n] for n in names}, stacked)
    dense_rows = append_adapter_rows(stacked, full, adapter_rows) if len(full) < len(task_names) else {}
    base_digest = model_digest("", [entry(n, tensor_digest(theta0[n])) for n in names])
    fingerprint, task_digests = set_fingerprint([*task_names, *held_out], expert_digests, base_digest)
    base_buffers = {n: b.detach() for n, b in base_model.named_buffers()}
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
        fingerprint=fingerprint,
        task_digests=task_digests,
        sources={"base": base, **sources},
        held_out=list(held_out),
        dense_rows=dense_rows,
        lora={m: stack_lora(parts) for m, parts in lora_parts.items()},
        family=kind.name,
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
