"""Plain LoRA adapters read straight from their files, without building the base model (sharded loading).

The whole loader applies an adapter to a full copy of the base with peft (``divmerge.experts.adapters``).
Under sharded loading no rank may hold a whole base, so an adapter whose every update is a plain
low-rank sum s * B (A x) on a linear layer of the merged model (the common case: LoRA on attention and
MLP projections) is read from ``adapter_model.safetensors`` as its factors (A (r, in), s * B (out, r)),
the same tensors the whole loader keeps. Anything else (DoRA and the other variants, LoRA biases,
``modules_to_save``, rank or alpha patterns, LoRA on an embedding or a tied weight, a recorded base that
is another local model) is left to the whole loader: ``plain_lora_refusal`` says why.
"""

import json
import math
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from divmerge.experts.adapters import ADAPTER_CONFIG

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # where peft saves the wrapped model's tensors
_FACTORS = (".lora_A.weight", ".lora_B.weight")
_NOT_PLAIN = (  # adapter_config.json settings that make an update more than s * B (A x) on given layers
    "use_dora",
    "lora_bias",
    "use_qalora",
    "alora_invocation_tokens",
    "modules_to_save",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "rank_pattern",
    "alpha_pattern",
)


def _config(path: str) -> dict:
    try:
        config = json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _modules(path: str) -> dict[str, list[str]] | None:
    """Module -> its factor keys in the adapter's safetensors file (None: a key that is not a factor)."""
    with safe_open(str(Path(path).expanduser() / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
    modules: dict[str, list[str]] = {}
    for key in keys:
        suffix = next((s for s in _FACTORS if key.endswith(s)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            return None
        modules.setdefault(key[len(_PREFIX) : -len(suffix)], []).append(key)
    return modules


def plain_lora_refusal(path: str, base_path: str, linear_modules: Collection[str]) -> str | None:
    """Why the adapter at ``path`` cannot be read as plain LoRA factors (None: it can).

    Args:
        path: The adapter directory.
        base_path: The configured base, resolved.
        linear_modules: Names of the merged model's ``nn.Linear`` modules whose weight is merged and
            not tied to another tensor.
    """
    config = _config(path)
    if config.get("peft_type") != "LORA" or config.get("task_type") not in (None, "CAUSAL_LM"):
        return "it is not a causal-LM LoRA adapter"
    special = [key for key in _NOT_PLAIN if config.get(key)]
    if special:
        return f"it sets {special[0]}"
    recorded = config.get("base_model_name_or_path")
    other = Path(recorded).expanduser() if recorded else None
    if other is not None and other.is_dir() and other.resolve() != Path(base_path).expanduser().resolve():
        return "it records another local base, compared weight by weight when read whole"
    if not (Path(path).expanduser() / ADAPTER_WEIGHTS).is_file():
        return f"it has no {ADAPTER_WEIGHTS}"
    modules = _modules(path)
    if modules is None:
        return "its file holds tensors other than LoRA factors"
    outside = sorted(m for m, keys in modules.items() if m not in linear_modules or len(keys) != 2)
    if outside:
        return f"its LoRA on {outside[0]!r} is not on an untied linear layer"
    return None


def read_plain_lora(path: str) -> dict[str, tuple[Tensor, Tensor]]:
    """The adapter's factors per module: (A (r, in), s * B (out, r)) in float32, s = alpha / r.

    Exactly what ``load_adapter`` keeps for a plain LoRA layer (peft's scaling: alpha / sqrt(r) with
    ``use_rslora``). Call only where ``plain_lora_refusal`` is None.
    """
    config = _config(path)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    factors = {}
    with safe_open(str(Path(path).expanduser() / ADAPTER_WEIGHTS), framework="pt") as f:
        for module in sorted(_modules(path) or {}):
            a = f.get_tensor(f"{_PREFIX}{module}.lora_A.weight").to(torch.float32)  # (r, in)
            b = f.get_tensor(f"{_PREFIX}{module}.lora_B.weight").to(torch.float32)  # (out, r)
            factors[module] = (a, b * scaling)
    return factors
