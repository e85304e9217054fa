"""Export a merge as one peft LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors``.

What goes where (module names relative to the model the adapter is loaded on: ``AutoModelForCausalLM``
for causal LMs, the backbone ``AutoModel`` for classifiers):

- A ``nn.Linear`` / ``Conv1D`` weight the merge changes becomes a LoRA target. With LoRA experts and
  task / layer / block coefficients the merged update sum_t c_t s_t B_t A_t is low-rank and written
  exactly: A = concat_t A_t (rows), B = concat_t c_t s_t B_t (columns), rank R = sum_t r_t, lora_alpha =
  R (scaling 1; a module of another rank gets it in ``rank_pattern`` / ``alpha_pattern``). Otherwise
  (``lora_rank``: full experts, densified adapters, the row / svd spaces, a ``start_from`` or static
  merge) the merged update theta - theta_0 of each matrix is compressed by truncated SVD, as mergekit's
  extract-lora does (Eckart-Young: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T), and its relative Frobenius
  error ||delta - B A|| / ||delta|| is reported.
- Where the merge changes such a layer's bias, every target's bias is saved whole (peft
  ``bias="lora_only"``: loading the adapter writes them into the base model's layers): exact, and
  ``merge_and_unload`` works (peft's ``lora_bias`` cannot merge into layers without a bias).
- Any other changed tensor (embeddings, norms) saves its whole module (peft ``modules_to_save``): exact;
  a tied input / output embedding is saved under both names with ``ensure_weight_tying``.
- Classification heads are not merged: each task's head goes under ``heads/<task>/`` as in the dense
  export (``divmerge.export.classifier``).

The dense merged model is never built for the exact case (only the factors and the changed tensors are
read). Like the other exporters, the directory is written beside the target and renamed into place.
"""

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from divmerge.core import lora
from divmerge.core.merged_model import MergedModel
from divmerge.errors import DivMergeError
from divmerge.experts.sources import resolve_source
from divmerge.export.classifier import _write_head
from divmerge.export.common import (
    CARD_FILE,
    EXPORT_FILE,
    FORMAT_VERSION,
    SAFETENSORS_METADATA,
    atomic_dir,
    check_target,
    check_task_names,
    load_base_config,
    relative_files,
)
from divmerge.export.model_card import jsonable, md

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = "base_model.model."  # where peft saves the wrapped model's tensors


@dataclass
class AdapterPlan:
    """What the adapter holds, module names relative to the model it loads on.

    Attributes:
        factors: LoRA target -> (A (r, in), B (out, r)), scaling 1.
        biases: LoRA target -> its merged bias (out,), saved whole (peft ``bias="lora_only"``).
        biases_changed: Whether the merge changes any of those biases.
        saved: Tensor name -> whole merged tensor, of the ``modules_to_save`` modules (tied names included).
        modules_to_save: Modules saved whole.
        tied: Whether a saved module's weight is tied to another (``ensure_weight_tying``).
        errors: LoRA target -> relative Frobenius error of its compressed update (compressed ones only).
        conv1d: Whether the targets are ``Conv1D`` layers (weights stored (in, out): ``fan_in_fan_out``).
    """

    factors: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    biases: dict[str, Tensor] = field(default_factory=dict)
    biases_changed: bool = False
    saved: dict[str, Tensor] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    tied: bool = False
    errors: dict[str, float] = field(default_factory=dict)
    conv1d: bool = False


def export_lora(
    merged: MergedModel,
    params: Mapping[str, Tensor],
    base_source: str,
    out_dir: str | Path,
    summary: Mapping[str, Any],
    overwrite: bool = False,
    rank: int | None = None,
) -> tuple[Path, str]:
    """Write the merge as one peft LoRA adapter over the base (plus each classifier task's head).

    Args:
        merged: The merged model (its base theta_0, skeleton, heads and prefix are read).
        params: Merged tensors as ``merged.merged_params`` gives them (LoRA modules as factors).
        base_source: Source of the base model the adapter applies to.
        out_dir: Target directory; created atomically.
        summary: Method, experts, coefficient statistics...: recorded in the card and
            ``divmerge_export.json``.
        overwrite: Replace a non-empty ``out_dir`` (the old one is removed only once the new one is done).
        rank: Compress every changed matrix's merged update to this rank by truncated SVD; None writes
            the exact low-rank update, refused where the merge is not low-rank.

    Returns:
        (the adapter directory, a one-line description of the rank and the compression error).
    """
    out = Path(out_dir).expanduser().absolute()
    check_target(out, overwrite, base_source, summary)
    if rank is not None and rank < 1:
        raise DivMergeError(f"--lora_rank must be a positive integer, not {rank}: pass e.g. --lora_rank 16.")
    heads = bool(merged.prefix)
    if heads:
        check_task_names(merged.task_names)
    plan = plan_adapter(merged, params, rank)
    source = resolve_source(base_source)
    _check_fits(plan, merged, source, base_source)
    config = adapter_config(plan, source, "CAUSAL_LM" if not heads else None)
    note = describe(plan, config)
    with atomic_dir(out) as tmp:
        tensors = {f"{_KEY}{m}.lora_A.weight": a.contiguous() for m, (a, _) in plan.factors.items()}
        tensors |= {f"{_KEY}{m}.lora_B.weight": b.contiguous() for m, (_, b) in plan.factors.items()}
        if plan.biases_changed:
            tensors |= {f"{_KEY}{m}.base_layer.bias": v.contiguous() for m, v in plan.biases.items()}
        tensors |= {f"{_KEY}{n}": v.contiguous() for n, v in plan.saved.items()}
        save_file(tensors, tmp / ADAPTER_WEIGHTS_FILE, metadata=SAFETENSORS_METADATA)
        (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tasks = {}
        if heads:
            for t, task in enumerate(merged.task_names):
                head = dict(merged.heads[t].items())
                dtype = next(iter(head.values())).dtype if head else torch.float32
                tasks[task] = _write_head(tmp, task, head, merged._skeletons[t].config, dtype)
        card = _card(out, base_source, merged.task_names, summary, plan, config, note, heads)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        info = {
            "format": "divmerge-export",
            "version": FORMAT_VERSION,
            "kind": "lora_adapter",
            "base_source": base_source,
            "task_names": list(merged.task_names),
            "tasks": tasks,
            "adapter": {
                "rank": config["r"],
                "rank_pattern": config["rank_pattern"],
                "exact": not plan.errors,
                "targets": sorted(plan.factors),
                "modules_to_save": plan.modules_to_save,
                "relative_errors": plan.errors,
            },
            "summary": jsonable(summary),
        }
        info["files"] = sorted([*relative_files(tmp), EXPORT_FILE])
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out, note


def plan_adapter(merged: MergedModel, params: Mapping[str, Tensor], rank: int | None) -> AdapterPlan:
    """Sort the merge's changes into LoRA factors, LoRA biases and whole saved modules.

    Args:
        merged: The merged model (base theta_0, skeleton, prefix).
        params: Its merged tensors (``merged_params``), LoRA modules as factors.
        rank: Truncated-SVD rank of every changed matrix's update; None: exact, refused if impossible.

    Returns:
        The adapter's contents.
    """
    dense, factors = lora.split(params)
    root = merged.skeleton(0).get_submodule(merged.prefix) if merged.prefix else merged.skeleton(0)
    cut = len(merged.prefix) + 1 if merged.prefix else 0
    tied = _tied_names(root)
    changed: dict[str, Tensor] = {}  # name (relative to root) -> merged tensor, where it differs from theta_0
    for name in merged.names:
        value, base = dense.get(merged.full_name(name)), merged.base[name]
        if value is not None and value is not base and not torch.equal(value.to(base.device), base):
            changed[name] = value
    lora_factors = {m[cut:]: f for m, f in factors.items()}
    targets: dict[str, nn.Module] = {}  # matrix modules: LoRA targets
    plan = AdapterPlan()
    saved_modules: dict[str, nn.Module] = {}
    for name in [*changed, *(f"{m}.weight" for m in lora_factors)]:
        module_name, _, leaf = name.rpartition(".")
        module = root.get_submodule(module_name)
        if isinstance(module, (nn.Linear, Conv1D)) and leaf in ("weight", "bias") and name not in tied:
            targets[module_name] = module
        else:
            owner = _saved_module(root, module_name, tied.get(name, []))
            saved_modules[owner] = root.get_submodule(owner)
    dense_matrices = [m for m in targets if f"{m}.weight" in changed]
    if rank is None and dense_matrices:
        raise DivMergeError(
            f"The merge is not low-rank ({dense_matrices[0]}.weight changes densely: full or densified "
            "experts, a start_from or static merge, or the row / svd space): pass --lora_rank r to compress "
            "each matrix's update by truncated SVD (its error is reported), or export --format hf."
        )
    if rank is not None:
        for m, module in targets.items():
            limit = min(_out_in(module))
            if rank > limit:
                raise DivMergeError(
                    f"--lora_rank {rank} is above the size of {m}.weight {tuple(_out_in(module))}: pass "
                    f"--lora_rank between 1 and {limit}."
                )
    for m, module in targets.items():
        plan.conv1d |= isinstance(module, Conv1D)
        low = lora_factors.get(m)
        out_features, in_features = _out_in(module)
        if f"{m}.weight" not in changed and (rank is None or low is None or low[0].shape[0] <= rank):
            if low is None:  # only the bias changed: a rank-1 zero update carries it
                low = (torch.zeros(1, in_features), torch.zeros(out_features, 1))
            plan.factors[m] = (low[0].detach().float().cpu(), low[1].detach().float().cpu())  # exact
        else:
            assert rank is not None  # refused above otherwise
            if f"{m}.weight" not in changed:  # a low-rank update above the rank: SVD through its factors
                a, b, error = truncated_factors(
                    low[0].detach().float().cpu(), low[1].detach().float().cpu(), rank
                )
            else:
                diff = (
                    changed[f"{m}.weight"].detach().float().cpu() - merged.base[f"{m}.weight"].float().cpu()
                )
                update = diff.t() if isinstance(module, Conv1D) else diff  # (out, in)
                if low is not None:
                    update = update + low[1].detach().float().cpu() @ low[0].detach().float().cpu()
                a, b, error = truncated(update, rank)
            plan.factors[m], plan.errors[m] = (a, b), error
        bias = f"{m}.bias"
        if bias in merged.base:  # peft's bias="lora_only": a target's bias is saved whole, in place
            plan.biases[m] = changed.get(bias, merged.base[bias]).detach().cpu()
            plan.biases_changed |= bias in changed
    for module_name, module in saved_modules.items():
        plan.modules_to_save.append(module_name)
        for leaf, _ in module.named_parameters():
            name = f"{module_name}.{leaf}"
            names = [name, *tied.get(name, [])]
            value = next((changed[n] for n in names if n in changed), None)
            value = (
                next((merged.base[n] for n in names if n in merged.base), None) if value is None else value
            )
            if value is None:  # not a merged tensor: the saved copy keeps the base's
                continue
            for alias in names:
                plan.saved[alias] = value.detach().cpu().clone()
            plan.tied |= name in tied
    return plan


def _check_fits(plan: AdapterPlan, merged: MergedModel, source: str, base_source: str) -> None:
    """Refuse an adapter whose tensors do not fit the base model (experts that extended the vocabulary)."""
    config = load_base_config(source, base_source)
    with torch.device("meta"):
        model = (AutoModel if merged.prefix else AutoModelForCausalLM).from_config(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    ours = {n: tuple(v.shape) for n, v in plan.saved.items()}
    ours |= {f"{m}.weight": tuple(merged.base[f"{m}.weight"].shape) for m in plan.factors}
    for name, shape in ours.items():
        if shapes.get(name) != shape:
            raise DivMergeError(
                f"The merge's {name} has shape {shape} but the base {base_source!r} has "
                f"{shapes.get(name)} (experts that add tokens extend it): a peft adapter cannot resize its "
                "base; export --format hf."
            )


def truncated(update: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The best rank-``rank`` factors of ``update`` (Eckart-Young) and their relative Frobenius error.

    Args:
        update: A matrix's merged update, (out, in), float32.
        rank: 1 <= rank <= min(out, in).

    Returns:
        (A (rank, in), B (out, rank), ||update - B A||_F / ||update||_F; 0 for a zero update).
    """
    u, s, vh = torch.linalg.svd(update.float(), full_matrices=False)  # (out, k), (k,), (k, in)
    return _split(u, s, vh, rank)


def truncated_factors(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``truncated(b @ a, rank)`` without forming b @ a: the SVD of a small (R, R) core.

    With B = Q_b R_b and A^T = Q_a R_a (thin QR), B A = Q_b (R_b R_a^T) Q_a^T, so the SVD of the core
    R_b R_a^T = U' S V'^T gives B A = (Q_b U') S (Q_a V')^T.

    Args:
        a: (R, in).
        b: (out, R).
        rank: 1 <= rank <= min(out, in).

    Returns:
        As ``truncated``.
    """
    q_b, r_b = torch.linalg.qr(b)  # (out, R), (R, R)
    q_a, r_a = torch.linalg.qr(a.t())  # (in, R), (R, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.t())  # (R, R), (R,), (R, R)
    return _split(q_b @ u, s, vh @ q_a.t(), rank)  # (out, R), (R,), (R, in)


def _split(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Factors A (rank, in), B (out, rank) of the leading ``rank`` singular triplets, and the error."""
    root = s[:rank].sqrt()  # (rank,) split evenly between the factors
    b = u[:, :rank] * root  # (out, rank)
    a = root[:, None] * vh[:rank]  # (rank, in)
    total = s.double().square().sum()
    error = (s[rank:].double().square().sum() / total).sqrt().item() if total > 0 else 0.0
    return a.contiguous(), b.contiguous(), error


def adapter_config(plan: AdapterPlan, base: str, task_type: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` of ``plan``: every target at scaling 1 (lora_alpha = its rank)."""
    ranks = {m: a.shape[0] for m, (a, _) in plan.factors.items()}
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    pattern = {m: r for m, r in ranks.items() if r != common}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(plan.factors),
        "modules_to_save": plan.modules_to_save or None,
        "ensure_weight_tying": plan.tied,
        "lora_bias": False,
        "fan_in_fan_out": plan.conv1d,
        "lora_dropout": 0.0,
        "bias": "lora_only" if plan.biases_changed else "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def describe(plan: AdapterPlan, config: Mapping[str, Any]) -> str:
    """One line: the rank and, where compressed, the relative errors' mean and max."""
    ranks = (
        "rank " + str(config["r"]) + (" (per-module ranks in rank_pattern)" if config["rank_pattern"] else "")
    )
    saved = f", {len(plan.modules_to_save)} modules saved whole" if plan.modules_to_save else ""
    if not plan.errors:
        return f"exact LoRA adapter, {ranks}, {len(plan.factors)} target modules{saved}"
    worst = max(plan.errors, key=plan.errors.__getitem__)
    mean = sum(plan.errors.values()) / len(plan.errors)
    return (
        f"LoRA adapter, {ranks}, {len(plan.factors)} target modules{saved}; relative Frobenius error of "
        f"the {len(plan.errors)} compressed updates: mean {mean:.3g}, max {plan.errors[worst]:.3g} ({worst})"
    )


def _tied_names(root: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names of the same tensor (tied weights), for tied parameters only."""
    names_of: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    return {n: [o for o in names if o != n] for names in names_of.values() if len(names) > 1 for n in names}


def _saved_module(root: nn.Module, module_name: str, aliases: list[str]) -> str:
    """The module ``modules_to_save`` names for a tensor: of tied names, the embedding (peft ties others)."""
    for candidate in [module_name, *(a.rpartition(".")[0] for a in aliases)]:
        if isinstance(root.get_submodule(candidate), nn.Embedding):
            return candidate
    return module_name


def _out_in(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def _card(
    out: Path,
    base_source: str,
    tasks: list[str],
    summary: Mapping[str, Any],
    plan: AdapterPlan,
    config: Mapping[str, Any],
    note: str,
    heads: bool,
) -> str:
    """The adapter's README.md: what it holds, how to load it, and each compressed matrix's error."""
    experts = summary.get("experts", {})
    path = f"path/to/{out.name}"
    auto = "AutoModel" if heads else "AutoModelForCausalLM"
    lines = [
        "---\nlibrary_name: peft\ntags:\n- divmerge\n- model-merging\n- lora\n---\n",
        f"# {out.name}\n",
        f"A {md(summary.get('method', 'merge'))} of {len(tasks)} experts fine-tuned from `{base_source}`, "
        "made with divmerge (DivMerge, arXiv 2509.02108), written as one peft LoRA adapter over the base: "
        f"{note}.\n",
        "## Experts\n",
        *[f"- `{task}`: `{md(experts.get(task, ''))}`" for task in tasks],
        "",
    ]
    coefficients = summary.get("coefficients")
    if isinstance(coefficients, Mapping) and coefficients:
        lines += ["## Coefficients\n", "| Task | mean | min | max | std |", "|---|---|---|---|---|"]
        for task, entry in coefficients.items():
            if isinstance(entry, Mapping):
                values = " | ".join(
                    f"{entry.get(k, float('nan')):.4g}" for k in ("mean", "min", "max", "std")
                )
                lines.append(f"| {md(task)} | {values} |")
        lines.append("")
    lines += [
        "## How to load\n",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto}, AutoTokenizer\n",
        f'base = {auto}.from_pretrained("{base_source}")',
        f'model = PeftModel.from_pretrained(base, "{path}")  # .merge_and_unload() for a plain model',
        f'tokenizer = AutoTokenizer.from_pretrained("{base_source}")',
        "```\n",
    ]
    if heads:
        lines += [
            "The adapter applies to the backbone (`AutoModel`). A task's classifier is that task's "
            "classifier class with the adapted backbone and the task's own head (`heads/<task>/`):\n",
            "```python",
            "from safetensors.torch import load_file",
            "from transformers import AutoConfig, AutoModelForSequenceClassification\n",
            f'task_dir = "{path}/heads/{tasks[0] if tasks else "<task>"}"',
            "classifier = AutoModelForSequenceClassification.from_pretrained(",
            f'    "{base_source}", config=AutoConfig.from_pretrained(task_dir)',
            ")",
            "setattr(classifier, classifier.base_model_prefix, model.merge_and_unload())",
            'classifier.load_state_dict(load_file(f"{task_dir}/head.safetensors"), strict=False)',
            "```\n",
        ]
    saved = ", ".join(f"`{m}`" for m in plan.modules_to_save)
    lines += [
        "## What the adapter holds\n",
        f"- LoRA targets: {len(plan.factors)} matrices (rank {config['r']}, lora_alpha = rank: scaling 1"
        + (", other ranks in `rank_pattern`" if config["rank_pattern"] else "")
        + ")",
        f"- Biases saved whole (`bias: lora_only`, written into the base's layers on loading): "
        f"{len(plan.biases) if plan.biases_changed else 0}",
        f"- Modules saved whole (`modules_to_save`): {saved or 'none'}",
        "",
    ]
    if plan.errors:
        lines += [
            "## Compression error\n",
            f"Each matrix's merged update theta - theta_0 was truncated to rank {config['r']} by SVD; the "
            "relative Frobenius error ||delta - B A|| / ||delta|| of each:\n",
            "| Matrix | Relative error |",
            "|---|---|",
            *[f"| `{m}` | {e:.4g} |" for m, e in plan.errors.items()],
            "",
        ]
    else:
        lines.append("The adapter is exact: it reproduces the merged model (no compression).\n")
    lines.append(f"`{EXPORT_FILE}` records the merge summary, the adapter's contents and every file.\n")
    return "\n".join(lines)
