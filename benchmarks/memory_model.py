"""The per-rank memory model of a learned merge, and how many 80 GB GPUs a 0.5B / 7B / 70B merge needs.

Per rank, with P parameters (P_blk in the largest repeated block, P_out outside the blocks: embeddings,
LM head, final norm; P_max the largest tensor), T experts, N ranks sharing the storage
(``ModelParallelStrategy``; N = 1 otherwise), s bytes per stored task-vector element (2 for bf16
storage, 4 for float32), c bytes per element of the compute dtype (2 under bf16-mixed, 4 in float32)
and a start merge or not (S = 1 or 0):

    stored    = (4 * (1 + S) + T * s) * P / N                 float32 base (and start), task vectors
    whole     = stored + 8 * P + 8 * P_max + A                + float32 merged model and its gradient
    per_block = stored + 8 * P_out + (2 * c + 8) * P_blk + 8 * P_max + A
    load      = stored + (4 * P_max + s * P) / N      sharded loading (a whole load: 8 * P + T * s * P)

The base and the merged tensors are float32 whatever ``task_vector_dtype`` is (the merge is computed and
kept in float32; autocast casts a weight to bf16 per use). 8 * P_max is the largest tensor's float32
merge before and after its all-gather, and A the activations plus allocator and library overhead at the
chosen batch. The per-block merge holds one block's merged matrices and their gradient in the compute
dtype (bf16 under bf16-mixed: ``MergedModel.merge_block``) plus float32 buffers of the block's size
for the gradient's reduce-scatter (sharded) or its float32 merge, at a time, and the tensors outside
the blocks whole, in float32. ``load`` is the host RAM a rank needs while
loading: with sharded loading its share, the pages of one expert's file it reads (its share of that
file, memory-mapped, counted in the resident set until the file is closed) and the rows of one tensor
in float32; with a whole load the float32 base, one float32 expert and the stacks.
Measured on CPU (SmolLM2-135M, T = 4, float32; ``python -m benchmarks.sharded_memory`` and
``python -m benchmarks.per_block_memory``): ``stored`` exactly, and falling as 1/N; the steps' peak
above it 2.06 GB whole and 0.87 GB per block (4 x 64 tokens per task), i.e. A of about 0.6 GB there.

``python -m benchmarks.memory_model`` prints the table for 8 experts of three common sizes with bf16
storage, both modes, and the fewest 80 GB GPUs each needs (at most 90 % of a GPU used, A as given by
``--activations_gb``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common.architectures import ARCHITECTURES, GB, Architecture, per_rank_bytes


def fewest_gpus(
    arch: Architecture,
    experts: int,
    storage_bytes: int,
    mode: str,
    activations: float,
    gpu_bytes: float = 80 * GB,
    usable: float = 0.9,
    most: int = 4096,
) -> int | None:
    """The fewest ranks N whose per-rank total fits ``usable`` of one GPU (None: none up to ``most``)."""
    for n in range(1, most + 1):
        if per_rank_bytes(arch, experts, n, storage_bytes, mode, activations)["total"] <= usable * gpu_bytes:
            return n
    return None


def host_ram(arch: Architecture, experts: int, storage_bytes: int, ranks: int | None) -> str:
    """Host RAM per node while loading with ``ranks`` ranks, 8 a node: sharded, (whole) loading."""
    if ranks is None:
        return "-"
    terms = per_rank_bytes(arch, experts, ranks, storage_bytes, "per_block", 0.0)
    per_node = min(8, ranks)
    return f"{per_node * terms['load'] / GB:.0f} GB ({per_node * terms['load_whole'] / GB:.0f} GB)"


def table(experts: int, storage_bytes: int, activations: float) -> str:
    """The markdown table: per-rank GB at 8 ranks and the fewest 80 GB GPUs, per size and mode."""
    lines = [
        "| experts | P | mode | stored / rank at N = 8 | transient | per rank at N = 8 | fewest 80 GB GPUs "
        "| host RAM per node at load there (8 ranks a node): sharded (whole) loading |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for key in ("qwen2.5-0.5b", "llama-2-7b", "llama-3-70b"):
        arch = ARCHITECTURES[key]
        for mode in ("whole", "per_block"):
            terms = per_rank_bytes(arch, experts, 8, storage_bytes, mode, activations)
            n = fewest_gpus(arch, experts, storage_bytes, mode, activations)
            nodes = "none" if n is None else f"{n} ({math.ceil(n / 8)} node{'s' if n > 8 else ''})"
            lines.append(
                f"| {arch.name} x {experts} | {arch.params / 1e9:.2f} B | {mode} "
                f"| {terms['stored'] / GB:.1f} GB "
                f"| {terms['transient'] / GB:.1f} GB | {terms['total'] / GB:.1f} GB | {nodes} "
                f"| {host_ram(arch, experts, storage_bytes, n)} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="memory_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8, help="T, experts merged (default 8)")
    p.add_argument("--storage_bytes", type=int, default=2, help="bytes per stored element (2: bf16)")
    p.add_argument(
        "--activations_gb",
        type=float,
        default=8.0,
        help="A: activations and overhead per rank, GB (default 8: a few thousand tokens per step)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Print (and optionally write) the table."""
    args = build_parser().parse_args(argv)
    text = (
        f"# Memory model: {args.experts} experts, {args.storage_bytes}-byte storage, A = "
        f"{args.activations_gb:g} GB per rank, at most 90 % of an 80 GB GPU\n\n"
        + table(args.experts, args.storage_bytes, args.activations_gb * GB)
        + "\n"
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
