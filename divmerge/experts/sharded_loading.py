"""Sharded loading: each rank reads only its 1/N column share of the base and of every expert.

Under sharded storage (``divmerge.core.sharding``) rank r of N keeps the flat elements [lo, hi) of every
merged tensor (``column_range``) of the base and of each stacked task vector. Loading the experts whole
on every rank first would cost (2 + T) x model bytes of host RAM per rank (x ranks per node) before
the shards are cut; here each rank reads just its columns from the safetensors files
(:class:`~divmerge.experts.weight_files.WeightFiles`), so a rank's host memory stays at its share,
(1 + T) x model / N, plus one expert's share while it is read.

Nothing is instantiated at full size: the forward code comes from each model's config on the ``meta``
device (buffers such as rotary frequencies are computed for real), and the experts' fingerprint is
assembled from every rank's partial digests (``divmerge.core.digest``), so it equals the fingerprint of a
whole load: checkpoints and teacher caches are interchangeable between the two ways of loading.

LoRA adapter experts that are plain LoRA on linear layers (``divmerge.experts.lora_files``) are read
whole, as their factors (adapter-sized, kept whole on every rank as sharded merges keep them); they add
no task-vector rows, and the base's share stands for their merged tensors.
"""

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoConfig, PreTrainedModel

from divmerge.core.digest import (
    DigestPart,
    combine_digest,
    entry,
    factors_digest,
    model_digest,
    partial_digest,
    set_fingerprint,
)
from divmerge.core.expert_set import ExpertSet
from divmerge.core.lora import stack_lora
from divmerge.errors import DivMergeError
from divmerge.experts.adapters import is_adapter
from divmerge.experts.finite import factor_tensors, nonfinite, nonfinite_message
from divmerge.experts.kind import ExpertKind
from divmerge.experts.lora_files import plain_lora_refusal, read_plain_lora
from divmerge.experts.sources import missing_weights
from divmerge.experts.weight_files import WeightFiles, column_range


def sharded_refusal(kind: ExpertKind, paths: Mapping[str, str], held_out: Mapping[str, str]) -> str | None:
    """Why this expert set cannot be loaded sharded (None: it can).

    Args:
        kind: The model family's loading rules (its ``check_sources`` has run).
        paths: "base" and each expert's task name -> resolved source.
        held_out: Held-out tasks -> sources.

    Returns:
        A reason in a few words, or None.
    """
    reason = kind.sharded_refusal()
    if reason is not None:
        return reason
    if held_out:
        return "held-out classifiers are read whole"
    linear: set[str] | None = None
    for task, path in paths.items():
        if is_adapter(path):
            if linear is None:
                linear = linear_modules(empty_model(kind.base_class, paths["base"]))
            reason = plain_lora_refusal(path, paths["base"], linear)
            if reason is not None:
                return f"expert {task!r} is a LoRA adapter that is not plain LoRA on linear layers ({reason})"
            continue
        if not WeightFiles.present(path):
            return f"{task if task == 'base' else 'expert ' + repr(task)} has no local safetensors weights"
    return None


def empty_model(model_class: type, source: str) -> PreTrainedModel:
    """A model built from its config with parameters on the meta device and real buffers (no weights read).

    Buffers that are not weights (rotary frequencies, position ids) are computed as ``from_pretrained``
    would: the modules that own buffers but no parameters are materialised and initialised.
    """
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = model_class.from_config(config)
    for module in model.modules():
        if any(True for _ in module.buffers(recurse=False)) and not any(
            True for _ in module.parameters(recurse=False)
        ):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
    return model.eval()


def linear_modules(model: PreTrainedModel) -> set[str]:
    """Names of ``model``'s ``nn.Linear`` modules whose weight is its own (not tied to another tensor)."""
    owners: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)] = owners.get(id(param), 0) + 1
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and owners.get(id(module.weight)) == 1
    }


def load_sharded(
    kind: ExpertKind,
    sources: Mapping[str, str],
    paths: Mapping[str, str],
    mesh: DeviceMesh,
    task_vector_dtype: torch.dtype | None,
) -> ExpertSet:
    """Read this rank's columns of the base and every expert into a sharded expert set; a collective.

    Args:
        kind: The model family's loading rules.
        sources: "base" and each expert's task name (in task order) -> configured source.
        paths: The same keys -> resolved local directory.
        mesh: The 1-D mesh of ranks to shard over; every rank calls this alike.
        task_vector_dtype: Storage dtype of the task vectors (None: float32, the base's).

    Returns:
        An expert set whose ``base`` holds DTensors (numel,) ``Shard(0)`` and ``task_vectors`` DTensors
        (T, numel) ``Shard(1)``, with ``shapes`` giving each tensor's real shape.
    """
    rank, world = mesh.get_local_rank(), mesh.size()
    task_names = [t for t in sources if t != "base"]
    base_model = empty_model(kind.base_class, paths["base"])
    base_type = base_model.config.model_type
    shapes = {n: p.shape for n, p in base_model.named_parameters() if p.is_floating_point()}
    names = list(shapes)
    base_files = WeightFiles(paths["base"], "the base model")
    unnamed = [n for n in names if n not in base_files.names()]
    if unnamed:
        raise DivMergeError(
            f"The base's weights files name no tensor {unnamed[0]!r} of its model: load it whole (run "
            "without ModelParallelStrategy), or save it again with save_pretrained."
        )
    cols = {n: column_range(shapes[n].numel(), rank, world) for n in names}
    theta0 = {n: base_files.read_columns(n, *cols[n]) for n in names}  # (hi - lo,) float32
    # NaN / inf in this rank's columns: reported by every rank alike once gathered (gathered_digests)
    found = nonfinite(theta0.items())
    problem = None if found is None else nonfinite_message(f"The base model {sources['base']!r}", *found)
    base_files.close()  # its mapped pages leave the resident set: one file open at a time
    parts: dict[str, dict[str, DigestPart]] = {
        "base": {n: partial_digest(theta0[n], cols[n][0], s.numel()) for n, s in shapes.items()}
    }
    dtype = task_vector_dtype or torch.float32
    full = [t for t, task in enumerate(task_names) if not is_adapter(paths[task])]  # stored rows
    stacked = {n: torch.empty((len(full), hi - lo), dtype=dtype) for n, (lo, hi) in cols.items()}
    skeletons, num_labels, types = [], [], []
    lora_parts: dict[str, list[tuple[int, Tensor, Tensor]]] = {}  # module -> (task, A, s * B)
    extra: dict[str, str] = {}  # task -> its adapter factors' digest line
    for t, task in enumerate(task_names):
        if t not in full:  # a plain LoRA adapter: the base's weights plus factors, read whole (small)
            factors, lora_rank = read_plain_lora(paths[task])
            check_factors(task, factors, lora_rank, shapes, sources["base"])
            found = nonfinite(factor_tensors(factors))
            if problem is None and found is not None:
                problem = nonfinite_message(f"Expert {task!r}", *found)
            for m, (a, b) in factors.items():
                lora_parts.setdefault(m, []).append((t, a, b))
            parts[task], extra[task] = parts["base"], factors_digest(factors)
            model = empty_model(kind.expert_class, paths["base"])
        else:
            row = full.index(t)  # its row of the stacks
            files = WeightFiles(paths[task], f"expert {task!r}")
            model = empty_model(kind.expert_class, paths[task])
            if model.config.model_type != base_type:
                raise DivMergeError(
                    f"Expert {task!r} is a {model.config.model_type!r} model but the base is "
                    f"{base_type!r}: every expert must be fine-tuned from the configured base."
                )
            check_tensors(task, sources[task], files, shapes)
            parts[task] = {}
            for n, (lo, hi) in cols.items():
                theta = files.read_columns(n, lo, hi)  # (hi - lo,) float32
                found = nonfinite([(n, theta)]) if problem is None else None
                if found is not None:
                    problem = nonfinite_message(f"Expert {task!r}", *found)
                torch.sub(theta, theta0[n], out=stacked[n][row])  # tau_t's columns
                parts[task][n] = partial_digest(theta, lo, shapes[n].numel())
            files.close()
        types.append(model.config.model_type)
        num_labels.append(kind.num_outputs(model))
        kind.to_skeleton(model)
        skeletons.append(model)
    fingerprint, task_digests = gathered_digests(kind, task_names, types, shapes, parts, mesh, extra, problem)
    return ExpertSet(
        task_names=task_names,
        names=names,
        base={n: sharded_flat(theta0[n], shapes[n].numel(), mesh) for n in names},
        task_vectors={n: sharded_stack(stacked[n], shapes[n].numel(), mesh) for n in names},
        buffers={n: b.detach() for n, b in base_model.named_buffers()},
        heads=[{} for _ in task_names],
        skeletons=skeletons,
        prefix=kind.prefix(base_model),
        num_labels=num_labels,
        fingerprint=fingerprint,
        task_digests=task_digests,
        sources=dict(sources),
        family=kind.name,
        shapes=shapes,
        dense_rows={n: list(full) for n in names} if len(full) < len(task_names) else {},
        lora={m: stack_lora(p) for m, p in lora_parts.items()},
    )


def check_tensors(task: str, source: str, files: WeightFiles, shapes: Mapping[str, torch.Size]) -> None:
    """Refuse an expert whose files lack a merged tensor or store one in another shape."""
    missing = sorted(n for n in shapes if n not in files.names())
    if missing:
        raise missing_weights(f"expert {task!r}", source, missing)
    for n, shape in shapes.items():
        if files.shape(n) != tuple(shape):
            raise DivMergeError(
                f"Expert {task!r} tensor {n!r} has shape {files.shape(n)} but the base has {tuple(shape)}: "
                "experts must share the base's architecture."
            )


def check_factors(
    task: str,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    rank: int,
    shapes: Mapping[str, torch.Size],
    base: str,
) -> None:
    """Refuse an adapter whose factors do not fit the base's layers (it was trained on another base)."""
    for m, (a, b) in factors.items():
        out, inp = shapes[f"{m}.weight"]
        if a.shape[1] != inp or b.shape[0] != out or a.shape[0] != b.shape[1] or a.shape[0] != rank:
            raise DivMergeError(
                f"Adapter {task!r} does not fit the configured base {base!r} (its LoRA on {m!r} has A "
                f"{tuple(a.shape)} and B {tuple(b.shape)}, rank {rank} in its config, for a {out} x {inp} "
                "weight): it was trained on another base model, or its files disagree; set model.base to "
                "the adapter's base, or save the adapter again."
            )


def gathered_digests(
    kind: ExpertKind,
    task_names: list[str],
    types: list[str],
    shapes: Mapping[str, torch.Size],
    parts: Mapping[str, Mapping[str, DigestPart]],
    mesh: DeviceMesh,
    extra: Mapping[str, str],
    problem: str | None = None,
) -> tuple[str, list[str]]:
    """(fingerprint, per-task digests) from every rank's partial digests, as a whole load computes them.

    ``extra``: task -> a line appended to its expert's digest (an adapter's factors, the same on every
    rank). ``problem``: what this rank found wrong in its columns (non-finite values), or None: raised
    on every rank alike (the first rank's), so no rank goes on to wait for the others in a collective.
    """
    gathered: list[tuple[dict[str, dict[str, DigestPart]], str | None] | None] = [None] * mesh.size()
    dist.all_gather_object(gathered, (dict(parts), problem), group=mesh.get_group())
    found = [p for _, p in gathered if p is not None]  # type: ignore[misc]
    if found:
        raise DivMergeError(found[0])
    everyone = [p for p, _ in gathered]  # type: ignore[misc]

    def digest(key: str, name: str) -> str:
        return combine_digest(shapes[name], torch.float32, [p[key][name] for p in everyone])

    base = model_digest("", [entry(n, digest("base", n)) for n in shapes])
    experts = [
        model_digest(
            f"{model_type}|{kind.digest_tag}|",
            [entry(n, digest(task, n)) for n in shapes] + [extra.get(task, "")],
        )
        for task, model_type in zip(task_names, types, strict=True)
    ]
    return set_fingerprint(task_names, experts, base)


def sharded_flat(local: Tensor, numel: int, mesh: DeviceMesh) -> DTensor:
    """This rank's columns (hi - lo,) as the DTensor (numel,) ``Shard(0)`` that ``shard_flat`` makes."""
    return DTensor.from_local(
        local, mesh, [Shard(0)], run_check=False, shape=torch.Size([numel]), stride=(1,)
    )


def sharded_stack(local: Tensor, numel: int, mesh: DeviceMesh) -> DTensor:
    """This rank's columns (T, hi - lo) as the DTensor (T, numel) ``Shard(1)`` that ``shard_stacks`` makes."""
    shape = torch.Size([local.shape[0], numel])
    return DTensor.from_local(local, mesh, [Shard(1)], run_check=False, shape=shape, stride=(numel, 1))
