"""Size and time of ``export --format lora`` against the dense Hugging Face export, on MiniLM-L6.

Four synthetic SEQ_CLS LoRA adapters (rank ``--rank`` on every backbone linear layer, as the MiniLM LoRA
demo's ``zoo:lora/<task>`` twins) and four synthetic full experts (base + noise) over the packaged
all-MiniLM-L6-v2 (``benchmarks.common.experts.write_experts``), merged with random layer-wise coefficients.
Each row times the export call alone (experts loaded and merged before), single thread. The full
experts' noise is full-rank, so their compression errors are a worst case, not what trained experts give.

Run ``python -m benchmarks.lora_export`` (about 1-2 minutes on one core); prints a Markdown table.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common.experts import write_experts
from divmerge.core.merged_model import MergedModel
from divmerge.export import export_lora, export_merged
from divmerge.families import load_experts
from divmerge.zoo.demo import base_model_path

TARGETS = ["query", "key", "value", "dense"]


def megabytes(path: Path, name: str | None = None) -> float:
    """Bytes of one file of ``path`` (or of every file under it), in MB (10^6)."""
    files = [path / name] if name else [p for p in path.rglob("*") if p.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def main() -> None:
    """Write the experts, export each merge densely and as adapters, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8, help="Rank of each synthetic LoRA expert.")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="--lora_rank values to time.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="lora_export_"))
    base = str(base_model_path())
    dirs = write_experts(base, root / "experts", 4, args.rank, TARGETS)
    print("| experts (4, MiniLM-L6) | format | export s | weights MB | dir MB | relative error |")
    print("|---|---|---|---|---|---|")
    for kind in ("lora", "full"):
        merged = MergedModel(load_experts(base, {f"t{i}": d for i, d in enumerate(dirs[kind])}), "layer")
        with torch.no_grad():
            merged.coefficients.weight.uniform_(0.2, 0.6, generator=torch.Generator().manual_seed(0))
            params = merged.merged_params()
        start = time.perf_counter()
        out = export_merged(merged, params, base, root / f"hf_{kind}", {"method": "bench"})
        seconds = time.perf_counter() - start
        row = f"| {kind} | hf (dense) | {seconds:.2f} | {megabytes(out, 'model.safetensors'):.1f} |"
        print(f"{row} {megabytes(out):.1f} | |")
        for rank in [None, *args.ranks] if kind == "lora" else args.ranks:
            start = time.perf_counter()
            out, _ = export_lora(
                merged, params, base, root / f"lora_{kind}_{rank}", {"method": "bench"}, rank=rank
            )
            seconds = time.perf_counter() - start
            adapter = json.loads((out / "divmerge_export.json").read_text())["adapter"]
            errors = list(adapter["relative_errors"].values())
            error = f"mean {sum(errors) / len(errors):.3g}, max {max(errors):.3g}" if errors else "exact"
            name = f"lora --lora_rank {rank}" if rank else f"lora exact (rank {adapter['rank']})"
            weights = megabytes(out, "adapter_model.safetensors")
            print(f"| {kind} | {name} | {seconds:.2f} | {weights:.1f} | {megabytes(out):.1f} | {error} |")


if __name__ == "__main__":
    main()
