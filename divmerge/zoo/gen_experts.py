"""Generative demo experts: SmolLM2-135M-Instruct fine-tuned to answer one demo task.

``zoo:smollm2/<task>`` is a full fine-tune, ``zoo:smollm2/lora/<task>`` its LoRA twin (peft,
``task_type=CAUSAL_LM``). Each learns to answer the task's ``prompt`` (:mod:`divmerge.zoo.gen_tasks`),
sent through the chat template, with the answer word (or headline) and EOS. The loss is the cross-entropy
of the answer tokens only, and the LM head runs on the answer positions only (prompts left-padded so the
answers end every sequence), which is what makes a 135M-parameter fine-tune fit minutes on two CPU cores.

Recipe (measured on this project's 2-core machine, see the README): 384 training rows, one epoch, batch 8,
AdamW at 5e-5 (LoRA: rank 8 on every linear layer, 1e-3), prompts of at most 40 words of input.
"""

import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from divmerge.errors import DivMergeError
from divmerge.experts.build_once import build_once
from divmerge.families.causal_lm import chat_prompts
from divmerge.families.generation import answer_aligned, exact_match, pad_sequences
from divmerge.phases import EXPERT_PHASE, timed
from divmerge.quiet import quiet
from divmerge.zoo.demo import EXPERT_META_FILE, LORA_PREFIX, ExpertRecipe, model_fingerprint
from divmerge.zoo.gen_tasks import GENERATIVE_TASKS, HEADLINE_TASK, generative_table
from divmerge.zoo.smollm2 import SMOLLM2_NAME, smollm2_path

GEN_PREFIX = SMOLLM2_NAME + "/"
"""``zoo:smollm2/<task>`` names a generative demo expert, ``zoo:smollm2/lora/<task>`` its LoRA twin."""

GEN_RECIPE = ExpertRecipe(num_train=384, epochs=1, max_length=128, lr=5e-5, batch_size=8)
"""How the full generative experts are fine-tuned (``max_length``: prompt tokens kept, from the end)."""

GEN_LORA_RECIPE = ExpertRecipe(num_train=384, epochs=1, max_length=128, lr=1e-3, batch_size=8, lora_rank=8)
"""How their LoRA twins are trained: same rows, rank 8 (alpha 16) on every linear layer."""

_FORMAT_VERSION = 1  # bump to invalidate every cached generative expert when the training code changes
_EVAL_ROWS = 64  # held-out rows each expert is scored on after training
_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gen_expert(name: str) -> tuple[str, ExpertRecipe]:
    """The task and recipe of ``<task>`` or ``lora/<task>`` (a ``zoo:smollm2/`` name without its prefix).

    Args:
        name: The name after ``zoo:smollm2/``.

    Returns:
        (task, recipe).

    Raises:
        DivMergeError: If the task is not a generative demo task.
    """
    task, recipe = (
        (name[len(LORA_PREFIX) :], GEN_LORA_RECIPE) if name.startswith(LORA_PREFIX) else (name, GEN_RECIPE)
    )
    if task not in GENERATIVE_TASKS:
        raise DivMergeError(
            f"Unknown generative demo expert 'zoo:{GEN_PREFIX}{name}'; use zoo:{GEN_PREFIX}<task> or "
            f"zoo:{GEN_PREFIX}{LORA_PREFIX}<task> with a task among: {', '.join(GENERATIVE_TASKS)}."
        )
    return task, recipe


def gen_expert_dir(task: str, recipe: ExpertRecipe, cache_dir: Path, base: Path) -> Path:
    """Where the generative expert for this task, recipe and base lives (it may not exist yet).

    Args:
        task: A generative demo task.
        recipe: The fine-tuning recipe.
        cache_dir: The cache directory.
        base: The base model's directory.

    Returns:
        ``cache_dir/zoo/smollm2-<task>[-lora]-<short hash of recipe and base>``.
    """
    key = json.dumps(
        {
            "format": _FORMAT_VERSION,
            "task": task,
            "recipe": recipe.as_dict(),
            "base": model_fingerprint(base),
        },
        sort_keys=True,
    )
    lora = "-lora" if recipe.lora_rank is not None else ""
    return cache_dir / "zoo" / f"{SMOLLM2_NAME}-{task}{lora}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _encode(tokenizer: Any, task: str, table: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids through the chat template, answer ids + EOS) per row; prompts keep their end."""
    prompts = chat_prompts(tokenizer, task, list(table["prompt"]))
    answers = tokenizer(list(table["answer"]), add_special_tokens=False)["input_ids"]
    return [(p[-max_length:], [*a, tokenizer.eos_token_id]) for p, a in zip(prompts, answers, strict=True)]


def answer_loss(model: Any, rows: list[tuple[list[int], list[int]]], pad_id: int) -> Any:
    """Mean cross-entropy of the answer tokens, the LM head on the answer positions only.

    Args:
        model: A causal LM (or its peft wrapper) whose forward takes ``logits_to_keep``.
        rows: (prompt ids, answer ids) per example.
        pad_id: Padding id.

    Returns:
        Scalar loss.
    """
    import torch
    import torch.nn.functional as F

    prompts = [torch.tensor(p) for p, _ in rows]
    answers = [torch.tensor(a) for _, a in rows]
    ids, mask = answer_aligned(prompts, answers, pad_id)  # (B, P + A - 1)
    width = max(len(a) for a in answers)
    targets = torch.stack([F.pad(a, (0, width - len(a)), value=-100) for a in answers])  # (B, A)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width).logits
    return F.cross_entropy(logits[:, -width:].flatten(0, 1).float(), targets.flatten())  # (B * A, V)


def _score(
    model: Any, tokenizer: Any, task: str, rows: list[tuple[list[int], list[int]]], refs: list[str]
) -> float:
    """Greedy answers on held-out rows: exact match, or ROUGE-L F for the headline task."""
    import torch
    from torchmetrics.text import ROUGEScore

    model.eval()
    predictions = []
    with torch.inference_mode():
        for start in range(0, len(rows), 16):
            prompts = [p for p, _ in rows[start : start + 16]]
            ids, mask = pad_sequences([torch.tensor(p) for p in prompts], tokenizer.pad_token_id, left=True)
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=24 if task == HEADLINE_TASK else 4,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            predictions += [
                t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            ]
    if task == HEADLINE_TASK:
        return float(ROUGEScore(rouge_keys="rougeL")(predictions, refs)["rougeL_fmeasure"])
    return float(exact_match(predictions, refs).mean())


def _train(task: str, recipe: ExpertRecipe, base: Path, out: Path, progress: bool) -> None:
    """Fine-tune ``base`` on a generative demo task and save the expert (weights or adapter) into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenizer.pad_token_id = pad_id
    train_table = generative_table(task, "train")
    if len(train_table) < recipe.num_train:
        raise DivMergeError(
            f"Generative demo task {task!r} has {len(train_table)} training rows, fewer than the recipe's "
            f"num_train={recipe.num_train}; lower num_train."
        )
    rows = _encode(tokenizer, task, train_table.iloc[: recipe.num_train], recipe.max_length)
    pool = generative_table(task).iloc[:_EVAL_ROWS]
    held_out = _encode(tokenizer, task, pool, recipe.max_length)

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if recipe.lora_rank is not None:
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=recipe.lora_rank,
            lora_alpha=2 * recipe.lora_rank,
            target_modules=_LORA_TARGETS,
        )
        model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
    order = [
        i
        for _ in range(recipe.epochs)
        for i in random.Random(recipe.seed).sample(range(len(rows)), len(rows))
    ]
    batches = [order[i : i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
    name = GEN_PREFIX + (LORA_PREFIX if recipe.lora_rank is not None else "") + task
    started = last = time.perf_counter()
    losses = []
    for step, batch in enumerate(batches, 1):
        loss = answer_loss(model, [rows[i] for i in batch], pad_id)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        now = time.perf_counter()
        if progress and (now - last > 30 or step == len(batches)):
            last = now
            eta = (now - started) / step * (len(batches) - step)
            print(
                f"divmerge: expert {name}: step {step}/{len(batches)} | loss {losses[-1]:.3f} "
                f"| ETA {eta:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    seconds = time.perf_counter() - started
    score = _score(model, tokenizer, task, held_out, list(pool["answer"]))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {
        "task": task,
        "recipe": recipe.as_dict(),
        "base": str(base),
        "steps": len(batches),
        "first_loss": round(losses[0], 4),
        "last_loss": round(sum(losses[-8:]) / len(losses[-8:]), 4),
        "held_out_score": round(score, 4),
        "held_out_rows": len(held_out),
        "metric": "rougeL_f" if task == HEADLINE_TASK else "exact_match",
        "train_seconds": round(seconds, 1),
        "format": _FORMAT_VERSION,
    }
    (out / EXPERT_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def build_gen_expert(
    task: str,
    recipe: ExpertRecipe = GEN_RECIPE,
    cache_dir: Path | None = None,
    base: Path | None = None,
    progress: bool = True,
) -> Path:
    """Return the generative expert's directory, fine-tuning it first if it is not cached yet.

    Args:
        task: A generative demo task.
        recipe: The fine-tuning recipe (``lora_rank`` set: a LoRA adapter directory over ``base``).
        cache_dir: The cache directory; ``default_cache_dir()`` if None.
        base: The base model's directory; the packaged SmolLM2 (converted once) if None.
        progress: Whether to announce the build and print progress lines.

    Returns:
        The expert's directory (a ``save_pretrained`` model or adapter, the tokenizer, and
        :data:`~divmerge.zoo.demo.EXPERT_META_FILE` with its held-out score).
    """
    from divmerge.experts.sources import default_cache_dir

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    base = Path(base) if base is not None else smollm2_path(cache)
    final = gen_expert_dir(task, recipe, cache, base)

    def train(out: Path) -> None:
        if progress:
            kind = "LoRA" if recipe.lora_rank is not None else "full"
            print(
                f"divmerge: fine-tuning generative demo expert {task!r} ({kind}, {recipe.num_train} rows) "
                f"-> {final}",
                file=sys.stderr,
                flush=True,
            )
        with quiet(not progress), timed(EXPERT_PHASE):
            _train(task, recipe, base, out, progress)

    return build_once(final, EXPERT_META_FILE, "expert", train)
