"""Memory and step time of the whole-model merge against the per-block merge (``model.merge_mode``).

For each mode a fresh subprocess loads the expert set with ``load_experts`` (the real SmolLM2-135M demo
experts by default: ``zoo:smollm2/<task>``, built on first use), builds the merged model (layer-wise
coefficients), resets the peak resident set, and runs training steps as ``DivMergeModule`` does
(``per_task`` accumulation over the T tasks, each task's forward with the LM head on its last
``--answer`` positions only, JS against fixed random teacher distributions, Adam on the coefficients).
It reports:

- ``storage_mb``: what the merged model stores (base + task vectors), the same in both modes;
- ``rss_loaded_mb``: resident set once loaded (storage + the interpreter and libraries);
- ``step_peak_mb``: the peak resident set during the steps, above ``rss_loaded_mb``: the transient
  (merged tensors, their gradient) and the activations;
- ``merged_mb``: the model's merged float32 tensors (what the whole merge materialises, and again as its
  gradient); ``block_mb``: the largest block's (what the per-block merge holds at a time, twice);
- ``step_s``: the median step, both modes timed in one process in alternation (they share the stored
  tensors), and their ratio.

The table is printed and written to ``<out_dir>/per_block_memory.md`` (and ``.json``).
Run ``python benchmarks/per_block_memory.py --help``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._measure import MB, peak_rss_mb, reset_peak, rss_mb, run_worker_process  # noqa: E402
from benchmarks.step_cost import format_table, interleaved_times  # noqa: E402  (offline environment)
from divmerge.core import per_block  # noqa: E402
from divmerge.core.merge import accumulate_over_tasks  # noqa: E402
from divmerge.core.merged_model import MergedModel  # noqa: E402
from divmerge.families import causal_lm, load_experts  # noqa: E402
from divmerge.objectives import js_divergence  # noqa: E402
from divmerge.zoo import resolve_model  # noqa: E402

TASKS = ("rt", "sms_spam", "trec", "bbc_headline")
COLUMNS = ("mode", "storage_mb", "rss_loaded_mb", "step_peak_mb", "merged_mb", "block_mb", "step_s", "x_step")
LEGEND = (
    "storage_mb: base + task vectors the merged model stores; rss_loaded_mb: resident once loaded; "
    "step_peak_mb: peak resident set during the steps above rss_loaded_mb (transient + activations); "
    "merged_mb: all merged float32 tensors; block_mb: the largest block's; step_s: median step (both modes "
    "in one process, alternating); x_step: step_s over the whole mode's. MB = 10^6 bytes."
)


AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""Lightning precision -> the autocast dtype of the forward (None: float32 throughout)."""


def step_closure(merged: MergedModel, config: Mapping[str, Any]) -> Any:
    """One training step of ``merged`` on fixed random prompts and teachers (see the module docstring).

    ``config`` may name a ``device`` (default: where the merged model is), a Lightning ``precision``
    (``AUTOCAST``'s keys; default 32-true) for the forward (the merge itself stays float32) and a
    ``backbone_pass`` (``per_task``, default, or ``joint``: every task's prompts in one forward).
    """
    g = torch.Generator().manual_seed(0)
    device = torch.device(config.get("device", "cpu"))
    dtype = AUTOCAST[config.get("precision", "32-true")]
    vocab = int(merged.skeleton(0).config.vocab_size)
    batch, length, answer = int(config["batch_size"]), int(config["seq_len"]), int(config["answer"])
    tasks = range(len(merged.task_names))
    ids = {t: torch.randint(0, vocab, (batch, length), generator=g).to(device) for t in tasks}  # (B, L)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    teachers = {  # (B * A, V)
        t: torch.log_softmax(torch.randn(batch * answer, vocab, generator=g), -1).to(device) for t in tasks
    }
    optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=1e-3)

    def task_loss(t: int, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = causal_lm.forward(
                merged, params, ids[t], mask, logits_to_keep=answer
            ).logits  # (B, A, V)
        return js_divergence(teachers[t], logits.float().reshape(-1, vocab)).mean()

    def joint_loss(params: Mapping[str, torch.Tensor]) -> torch.Tensor:  # every task in one forward
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = causal_lm.forward(
                merged,
                params,
                torch.cat([ids[t] for t in tasks]),
                mask.repeat(len(tasks), 1),
                logits_to_keep=answer,
            ).logits  # (T * B, A, V)
        rows = logits.float().reshape(len(tasks), -1, vocab)  # (T, B * A, V)
        return sum(js_divergence(teachers[t], rows[t]).mean() for t in tasks)

    def step() -> None:
        if config.get("backbone_pass", "per_task") == "joint":
            loss = joint_loss(merged.step_params())
        else:
            loss, _ = accumulate_over_tasks(
                merged.step_params(), {t: (lambda p, t=t: task_loss(t, p)) for t in tasks}
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def sizes(merged: MergedModel) -> dict[str, float]:
    """Stored, merged and largest-block bytes of ``merged``, MB."""
    stores = (merged.base, merged.task_vectors)
    stored = sum(t.numel() * t.element_size() for store in stores for _, t in store.items())
    numel = {merged.full_name(n): merged.base[n].numel() for n in merged.names}
    blocks: dict[str, int] = {}
    for path in per_block.block_paths(merged.skeleton(0)):
        blocks[path] = sum(v for n, v in numel.items() if per_block.in_block(n, path))
    return {
        "storage_mb": stored / MB,
        "merged_mb": 4 * sum(numel.values()) / MB,
        "block_mb": 4 * max(blocks.values(), default=0) / MB,
    }


def expert_sources(text: str) -> dict[str, str]:
    """Comma-separated expert sources -> ``expert<i>``: source; zoo SmolLM2 experts are built (cached)."""
    sources = [s for s in text.split(",") if s]
    return {
        f"expert{i}": resolve_model(s[len("zoo:") :], build=True) if s.startswith("zoo:smollm2/") else s
        for i, s in enumerate(sources)
    }


def run_worker(config: Mapping[str, Any]) -> dict[str, Any]:
    """``memory``: one mode's resident set in this process; ``time``: both modes' steps, alternating."""
    torch.manual_seed(0)
    torch.set_num_threads(int(config["threads"]))
    experts = load_experts(config["base"], config["experts"])
    if config["job"] == "time":
        models = {mode: MergedModel(experts, "layer", merge_mode=mode) for mode in ("whole", "per_block")}
        del experts
        steps = {mode: step_closure(m, config) for mode, m in models.items()}
        times = interleaved_times(steps, int(config["steps"]), int(config["warmup"]))
        return {mode: statistics.median(t) for mode, t in times.items()}
    merged = MergedModel(experts, "layer", merge_mode=config["job"])
    del experts  # as DivMergeModule: only the merged model keeps the expert tensors
    gc.collect()
    step = step_closure(merged, config)
    loaded = rss_mb()
    reset_peak()
    for _ in range(int(config["warmup"]) + 1):
        step()
    return {"rss_loaded_mb": loaded, "step_peak_mb": peak_rss_mb() - loaded, **sizes(merged)}


def measure(config: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`run_worker` in a fresh Python process, so peaks never mix."""
    return run_worker_process(__file__, config)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="per_block_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="zoo:smollm2", help="base model source (default: SmolLM2-135M)")
    p.add_argument(
        "--experts",
        default=",".join(f"zoo:smollm2/{t}" for t in TASKS),
        help="comma-separated expert sources (default: the four generative demo experts)",
    )
    p.add_argument("--batch_size", type=int, default=4, help="prompts per task per step")
    p.add_argument("--seq_len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--answer", type=int, default=8, help="positions whose logits the loss reads")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads per subprocess")
    p.add_argument(
        "--out_dir", type=Path, default=ROOT / "benchmarks" / "results", help="where the table goes"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Measure each mode's memory in a subprocess, then both modes' step time; print and save the table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    experts = expert_sources(args.experts)  # demo experts are built here, once, not in the workers
    keys = ("base", "batch_size", "seq_len", "answer", "steps", "warmup", "threads")
    common = {k: getattr(args, k) for k in keys} | {"experts": experts}
    times = measure({**common, "job": "time"})
    rows = []
    for mode in ("whole", "per_block"):
        row = {"mode": mode, **measure({**common, "job": mode}), "step_s": times[mode]}
        row["x_step"] = times[mode] / times["whole"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    table = format_table(rows, COLUMNS)
    header = (
        f"# Whole vs per-block merge (base {args.base}, T = {len(experts)}, {args.batch_size} x "
        f"{args.seq_len} tokens per task, loss on the last {args.answer} positions, "
        f"{args.threads} threads)\n\n"
    )
    text = header + table + "\n\n" + LEGEND + "\n"
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "per_block_memory.md").write_text(text)
    (args.out_dir / "per_block_memory.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
