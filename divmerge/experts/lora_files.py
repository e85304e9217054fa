"""Plain LoRA adapters read straight from their files, without building the base model (sharded loading).

The whole loader applies an adapter to a full copy of the base with peft (``divmerge.experts.adapters``).
Under sharded loading no rank may hold a whole base, so an adapter whose every update is a plain
low-rank sum s * B (A x) on a linear layer of the merged model (the common case: LoRA on attention and
MLP projections) is read from ``adapter_model.safetensors`` as its factors (A (r, in), s * B (out, r)),
the same tensors the whole loader keeps. Anything else (DoRA and the other variants, LoRA biases,
``modules_to_save``, rank or alpha patterns, inits that rewrite the base weights such as PiSSA, any
setting this reader does not know, LoRA on an embedding or a tied weight, a recorded base that is
another local model) is left to the whole loader: ``plain_lora_refusal`` says why.
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
_PLAIN_KEYS = frozenset(  # adapter_config.json keys that never make an update more than s * B (A x)
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "target_modules",
        "exclude_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "use_rslora",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "megatron_core",
        "qalora_group_size",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "ensure_weight_tying",
        "bias",
    }
)
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")  # inits that leave the base weights as they are


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
    special = sorted(key for key, value in config.items() if value and key not in _PLAIN_KEYS)
    if special:  # a LoRA variant, or a setting newer than this reader: the whole loader knows better
        return f"it sets {special[0]}"
    if config.get("bias", "none") != "none":
        return f"it trains biases (bias: {config['bias']})"
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:  # peft rewrites the base weights
        return f"its init_lora_weights {config['init_lora_weights']!r} changes the base weights when loaded"
    recorded = config.get("base_model_name_or_path")
    other = Path(recorded).expanduser() if recorded else None
    if other is not None and other.is_dir() and other.resolve() != Path(base_path).expanduser().resolve():
        return "it records another local base, compared weight by weight when read whole"
    if not (Path(path).expanduser() / ADAPTER_WEIGHTS).is_file():
        return f"it has no {ADAPTER_WEIGHTS}"
    try:
        modules = _modules(path)
    except Exception as err:  # unreadable: the whole loader reports it in one line
        return f"its {ADAPTER_WEIGHTS} cannot be read ({type(err).__name__})"
    if modules is None:
        return "its file holds tensors other than LoRA factors"
    outside = sorted(m for m, keys in modules.items() if m not in linear_modules or len(keys) != 2)
    if outside:
        return f"its LoRA on {outside[0]!r} is not on an untied linear layer"
    return None


def read_plain_lora(path: str) -> tuple[dict[str, tuple[Tensor, Tensor]], int]:
    """The adapter's factors per module, (A (r, in), s * B (out, r)) in float32 with s = alpha / r, and r.

    Exactly what ``load_adapter`` keeps for a plain LoRA layer (peft's scaling: alpha / sqrt(r) with
    ``use_rslora``). Call only where ``plain_lora_refusal`` is None.
    """
    config = _config(path)
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))  # peft's defaults
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    factors = {}
    with safe_open(str(Path(path).expanduser() / ADAPTER_WEIGHTS), framework="pt") as f:
        for module in sorted(_modules(path) or {}):
            a = f.get_tensor(f"{_PREFIX}{module}.lora_A.weight").to(torch.float32)  # (r, in)
            b = f.get_tensor(f"{_PREFIX}{module}.lora_B.weight").to(torch.float32)  # (out, r)
            factors[module] = (a, b * scaling)
    return factors, r
