"""``python train.py export``: write a merged model (learned or static) in a ``--format`` (``FORMATS``)."""

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from divmerge.errors import DivMergeError
from divmerge.experts.sources import resolve_source
from divmerge.export import FORMATS, ExportRequest, check_target, coefficient_stats
from divmerge.export.gguf_file import DEFAULT_GGUF_TYPE, GGUF_TYPES
from divmerge.lightning.checkpoint_io import SafeCheckpointIO, check_checkpoint
from divmerge.lightning.module import DivMergeModule


def parse_export_args(argv: list[str], default_config: Path) -> tuple[argparse.Namespace, list[str]]:
    """Split ``export`` arguments into its own options and overrides for the model config.

    Args:
        argv: Arguments after ``export``.
        default_config: Config used when ``--config`` is absent.

    Returns:
        (export options, remaining ``--model.*`` / ``--data.*`` overrides).
    """
    parser = argparse.ArgumentParser(
        prog="train.py export",
        description="Write the merged model as a Hugging Face directory (backbone safetensors + config + "
        "tokenizer, every task's head under heads/, a model card), with --format lora as one peft LoRA "
        "adapter over the base, or with --format gguf as one GGUF file. Other --model.* flags override "
        "the config.",
    )
    parser.add_argument("--config", default=str(default_config), help="The run's config (default: the demo).")
    parser.add_argument(
        "--ckpt_path", help="Coefficient checkpoint of a learned merge (not needed for static methods)."
    )
    parser.add_argument("--out_dir", required=True, help="Output directory.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out_dir.")
    parser.add_argument(
        "--format",
        default="hf",
        help=f"Output format: {', '.join(FORMATS)} (default hf: the dense merged model as a Hugging Face "
        "directory; lora: one peft LoRA adapter over the base, exact for LoRA experts with task/layer/block "
        "coefficients, else needs --lora_rank; gguf: one llama.cpp / Ollama file of a causal-LM merge, "
        "with a Modelfile).",
    )
    parser.add_argument(
        "--lora_rank",
        type=int,
        help="--format lora: compress each changed matrix's merged update to this rank by truncated SVD "
        "(the relative errors go into the model card).",
    )
    parser.add_argument(
        "--gguf_type",
        default=DEFAULT_GGUF_TYPE,
        help=f"--format gguf: type of the matrices, one of {', '.join(GGUF_TYPES)} (default "
        f"{DEFAULT_GGUF_TYPE}; norms stay f32).",
    )
    return parser.parse_known_args(argv)


def run_export(
    options: argparse.Namespace, build_module: Callable[[list[str]], DivMergeModule], overrides: list[str]
) -> Path:
    """Load experts and coefficients, merge, and export.

    Args:
        options: From ``parse_export_args``.
        build_module: Instantiates the configured module from CLI arguments (without running anything).
        overrides: Extra config arguments.

    Returns:
        The export directory.
    """
    out_format = getattr(options, "format", "hf")
    if out_format not in FORMATS:
        raise DivMergeError(f"--format {out_format!r} is unknown: use one of {', '.join(FORMATS)}.")
    output = FORMATS[out_format]
    lora_rank = getattr(options, "lora_rank", None)
    if lora_rank is not None and out_format != "lora":
        raise DivMergeError(f"--lora_rank applies to --format lora, not {out_format!r}: add --format lora.")
    if lora_rank is not None and lora_rank < 1:
        raise DivMergeError(
            f"--lora_rank must be a positive integer, not {lora_rank}: pass e.g. --lora_rank 16."
        )
    format_options = {"lora_rank": lora_rank, "gguf_type": getattr(options, "gguf_type", DEFAULT_GGUF_TYPE)}
    module = build_module(["--config", options.config, *overrides])
    base_source = resolve_source(module.hparams.base)
    summary: dict[str, Any] = {"method": module.describe(), "experts": dict(module.hparams.experts)}
    check_target(Path(options.out_dir), options.overwrite, base_source, summary)  # before any heavy work
    output.check(base_source, format_options)
    merged = module.build()
    if not module.is_static:
        if not options.ckpt_path:
            raise DivMergeError(
                "A learned merge needs its coefficients: pass --ckpt_path (e.g. .../last.ckpt)."
            )
        module.check_checkpoint_meta(check_checkpoint(options.ckpt_path))
        state = SafeCheckpointIO().load_checkpoint(options.ckpt_path).get("state_dict")
        module.check_state_dict(state)
        module.load_state_dict(state)
        summary["coefficients"] = coefficient_stats(merged.coefficients().detach(), merged.task_names)
        summary.update(objective=module.hparams.objective, granularity=module.hparams.granularity)
    else:
        summary["method_options"] = dict(module.hparams.method_options or {})
    params = module.eval_params()
    request = ExportRequest(
        family=module.engine.family.name,
        merged=merged,
        params=params,
        base_source=base_source,
        out_dir=options.out_dir,
        summary=summary,
        overwrite=options.overwrite,
        options=format_options,
    )
    out, note = output.write(request)
    print(
        f"divmerge: exported {module.describe()} of {merged.task_names} to {out}"
        + (f" ({note})" if note else "")
    )
    return out
