"""GGUF export of a real-size merge: file size, export time, export peak memory, and answers read back.

The merge: SmolLM2-135M-Instruct (the packaged GGUF of ``zoo:smollm2``, converted once into the cache)
and two stand-in experts, the base with its MLP weights moved at random (``--noise`` times each
tensor's standard deviation), merged at the initial coefficients. The demo's fine-tuned experts are not
used: building them takes minutes each. Each output type is exported from the same merged tensors
(``export_gguf``, beside ``export_causal_lm`` for the Hugging Face reference), timed, with the peak
resident memory the export adds (VmHWM reset before each). Each file is then read back with transformers
(``gguf_file=``) and answers chat prompts greedily; the table gives how many answers equal the Hugging
Face export's, and the largest logit difference over the prompts.

Run ``python -m benchmarks.gguf_export --help``; the table goes to ``<out_dir>/gguf_export.md``.
"""

import argparse
import time
from pathlib import Path
from typing import Any

from benchmarks.common.measure import MB, peak_rss_mb, release_memory, reset_peak, rss_mb
from benchmarks.common.results import write_results

TYPES = ("f32", "f16", "bf16", "q8_0")
TEXTS = [
    "A gorgeous, witty, seductive movie.",
    "The plot is thin and the jokes fall flat.",
    "An instant classic, moving and funny.",
    "Boring, overlong and badly acted.",
    "WINNER!! Claim your free prize now by calling this number",
    "Are we still on for lunch today?",
]
QUESTION = "\nIs this positive, negative, or spam? Answer in one word."


def perturbed_experts(base: str, out: Path, noise: float) -> dict[str, str]:
    """Two experts: the base with MLP weights moved by ``noise`` x std of Gaussian noise (seeds 0, 1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    experts = {}
    for seed, task in enumerate(("one", "two")):
        path = out / f"expert_{task}"
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".mlp." in name:
                    p.add_(noise * p.std() * torch.randn(p.shape, generator=gen))
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
        experts[task] = str(path)
    return experts


def export_rows(
    base: str, experts: dict[str, str], out: Path, types: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Export the merge as Hugging Face (``hf``) and each GGUF type: size, wall time, added peak memory."""
    import torch

    from divmerge.core.merged_model import MergedModel
    from divmerge.export import export_causal_lm, export_gguf
    from divmerge.families import load_experts

    merged = MergedModel(load_experts(base, experts))
    with torch.no_grad():
        params = merged.merged_params()
    summary = {"method": "initial coefficients", "experts": experts}
    merged_mb = sum(p.numel() * p.element_size() for p in params.values()) / MB
    rows = []
    for kind in ("hf", *types):
        target = out / f"export_{kind}"
        release_memory()
        before, hwm = rss_mb(), reset_peak()
        start = time.perf_counter()
        if kind == "hf":
            export_causal_lm(merged, params, base, target, summary)
            file = target / "model.safetensors"
        else:
            export_gguf(merged, params, base, target, summary, gguf_type=kind)
            file = target / "model.gguf"
        seconds = time.perf_counter() - start
        added = peak_rss_mb() - before if hwm else float("nan")
        rows.append(
            {"type": kind, "size_mb": file.stat().st_size / MB, "export_s": seconds, "added_peak_mb": added}
        )
        rows[-1]["merged_mb"] = merged_mb
    return rows


def answer_rows(out: Path, rows: list[dict[str, Any]], max_new_tokens: int) -> None:
    """Read every GGUF back with transformers; add equal answers and the largest logit difference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def answers(model: Any, tokenizer: Any, prompts: list[str]) -> tuple[list[list[int]], list[Any]]:
        tokens, logits = [], []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits.append(model(ids).logits)
                out_ids = model.generate(
                    ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
                )
            tokens.append(out_ids[0, ids.shape[1] :].tolist())
        return tokens, logits

    tokenizer = AutoTokenizer.from_pretrained(out / "export_hf")
    prompts = [text + QUESTION for text in TEXTS]
    if tokenizer.chat_template:
        chats = [[{"role": "user", "content": prompt}] for prompt in prompts]
        prompts = [
            tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats
        ]
    reference = AutoModelForCausalLM.from_pretrained(out / "export_hf", dtype=torch.float32).eval()
    ref_tokens, ref_logits = answers(reference, tokenizer, prompts)
    rows[0].update(answers_equal=len(prompts), max_logit_diff=0.0, example=tokenizer.decode(ref_tokens[0]))
    del reference
    for row in rows[1:]:
        path = out / f"export_{row['type']}"
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file="model.gguf", dtype=torch.float32).eval()
        read_tokenizer = AutoTokenizer.from_pretrained(path, gguf_file="model.gguf")
        row["read_back_s"] = time.perf_counter() - start
        row["same_tokens"] = all(read_tokenizer(p)["input_ids"] == tokenizer(p)["input_ids"] for p in prompts)
        tokens, logits = answers(model, read_tokenizer, prompts)
        row["answers_equal"] = sum(a == b for a, b in zip(tokens, ref_tokens, strict=True))
        row["max_logit_diff"] = max(
            (a - b).abs().max().item() for a, b in zip(logits, ref_logits, strict=True)
        )
        row["example"] = read_tokenizer.decode(tokens[0])
        del model


def format_rows(rows: list[dict[str, Any]], prompts: int) -> str:
    """The markdown table."""
    lines = [
        "| output | file MB | export s | export adds peak MB | answers = HF export | max abs logit diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['type']} | {r['size_mb']:.0f} | {r['export_s']:.1f} | {r['added_peak_mb']:.0f} | "
            f"{r.get('answers_equal', '-')}/{prompts} | {r.get('max_logit_diff', float('nan')):.2e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; print and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="/tmp/divmerge_gguf_export", help="Where exports and table go.")
    parser.add_argument("--noise", type=float, default=0.02, help="Expert MLP noise, x each tensor's std.")
    parser.add_argument("--max_new_tokens", type=int, default=8, help="Greedy answer length.")
    parser.add_argument("--types", nargs="+", default=list(TYPES), help="GGUF types to export.")
    args = parser.parse_args(argv)
    from divmerge.experts.sources import resolve_source
    from divmerge.zoo import smollm2_gguf_file

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_source(str(smollm2_gguf_file()))
    experts = perturbed_experts(base, out, args.noise)
    rows = export_rows(base, experts, out, tuple(args.types))
    answer_rows(out, rows, args.max_new_tokens)
    table = format_rows(rows, len(TEXTS))
    merged_mb = rows[0]["merged_mb"]
    text = (
        f"{table}\n\nSmolLM2-135M-Instruct, 2 experts (MLP noise {args.noise} x std), merged tensors "
        f"{merged_mb:.0f} MB in memory; {len(TEXTS)} chat prompts, {args.max_new_tokens} greedy tokens.\n"
    )
    write_results(out, "gguf_export", text)
    print(text)
    for r in rows:
        print(r["type"], repr(r.get("example")), f"read back {r.get('read_back_s', 0):.0f} s")
    return text


if __name__ == "__main__":
    main()
