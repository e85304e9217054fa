"""Read a peft LoRA adapter directory over the configured base into a plain model plus LoRA factors.

An adapter expert is the configured base model with the adapter applied (peft ``PeftModel``): a sequence
classifier (task_type SEQ_CLS) or a causal LM (task_type CAUSAL_LM). Its plain LoRA layers on
``nn.Linear`` / ``Conv1D`` modules of the merged part (a classifier's backbone; all of a causal LM) are
kept as factors (A, s * B), never densified (see ``divmerge.core.lora``). Everything else the adapter changes
is returned as ordinary weights of a plain Hugging Face model, i.e. densified: LoRA on other layer types
(embeddings, convolutions, ``nn.MultiheadAttention``, ``target_parameters``), LoRA variants that are not
a plain low-rank sum (DoRA and the others in peft's ``lora_variants``, ``lora_bias``), LoRA layers inside
a classifier's head, and the ``modules_to_save`` copies (for a SEQ_CLS adapter, the classifier: that
expert's head).
"""

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

from divmerge.errors import DivMergeError, first_line

if TYPE_CHECKING:  # peft is imported where adapters are loaded: importing it costs seconds
    from peft import PeftConfig
    from peft.tuners.lora import LoraLayer

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER = "default"  # the adapter name PeftModel.from_pretrained loads under
_PEFT_PREFIX = "base_model.model."  # where peft saves the wrapped model's tensors
AdapterTaskType = Literal["SEQ_CLS", "CAUSAL_LM"]
"""The peft task types merged as adapters: LoRA over a sequence classifier or over a causal LM."""
_BASE_CLASS = {"SEQ_CLS": AutoModel, "CAUSAL_LM": AutoModelForCausalLM}  # how the merged base is loaded


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a local peft adapter directory (holds ``adapter_config.json``)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_task_type(path: str | Path) -> str | None:
    """The ``task_type`` recorded in an adapter directory's config (None when unset or unreadable)."""
    try:
        config = json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("task_type") if isinstance(config, dict) else None


def _num_labels(config: "PeftConfig", base_path: str, weights: dict[str, Tensor], task: str) -> int:
    """The adapter's number of classes: read off its saved classifier (a peft ``modules_to_save``).

    Two meta-device classifiers of the base (2 and 3 classes) show which head tensors depend on the
    number of classes and along which dimension; the adapter's copy of such a tensor gives its size.
    """
    shapes = []
    for n in (2, 3):
        base_config = AutoConfig.from_pretrained(base_path, num_labels=n)
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(base_config)
        shapes.append({name: tuple(p.shape) for name, p in model.named_parameters()})
    for name, two in shapes[0].items():
        saved = weights.get(_PEFT_PREFIX + name)
        if two != shapes[1][name] and saved is not None:
            dim = next(i for i, (x, y) in enumerate(zip(two, shapes[1][name], strict=True)) if x != y)
            return int(saved.shape[dim])
    raise DivMergeError(
        f"Adapter {task!r} has no classification head: train it with LoraConfig(task_type='SEQ_CLS') so "
        f"peft saves the classifier (modules_to_save), then save_pretrained it again (found modules_to_save "
        f"{config.modules_to_save}); an adapter of a causal LM needs task_type='CAUSAL_LM'."
    )


def check_base(
    task: str,
    config: "PeftConfig",
    base_path: str,
    base_source: str,
    base: PreTrainedModel,
    task_type: AdapterTaskType = "SEQ_CLS",
) -> None:
    """Refuse an adapter whose recorded base is a local model with other weights than the configured base.

    ``base_model_name_or_path`` in ``adapter_config.json`` names the model the adapter was trained on.
    When it is a local directory other than the configured base, its backbone weights are compared with
    the configured base's; a hub id cannot be checked offline, and shape mismatches are caught when
    the adapter is applied (``load_adapter``).

    Args:
        task: Task name (for messages).
        config: The adapter's peft config.
        base_path: The configured base, resolved to a local path or hub id.
        base_source: The configured base as written in the config (for messages).
        base: The configured base model (a classifier's backbone, or the causal LM).
        task_type: The experts' kind, which says how ``base`` was loaded.
    """
    recorded = config.base_model_name_or_path
    path = Path(recorded).expanduser() if recorded else None
    if path is None or not path.is_dir() or path.resolve() == Path(base_path).expanduser().resolve():
        return
    other = _BASE_CLASS[task_type].from_pretrained(path, dtype=torch.float32)
    theirs = dict(other.named_parameters())
    for name, value in base.named_parameters():
        if name not in theirs or not torch.equal(theirs[name].detach(), value.detach()):
            raise DivMergeError(
                f"Adapter {task!r} was trained on {recorded!r} (base_model_name_or_path in its "
                f"{ADAPTER_CONFIG}), whose weights differ from the configured base {base_source!r} "
                f"(first at {name}): set model.base to {recorded!r}, or use an adapter trained on the "
                "configured base."
            )


def _plain_lora(module: "LoraLayer") -> bool:
    """A LoRA layer whose update is exactly s * B (A x) on a Linear / Conv1D: kept as factors."""
    from peft.tuners.lora import Linear as LoraLinear

    return (
        type(module) is LoraLinear and _ADAPTER not in module.lora_variant and not module.lora_bias[_ADAPTER]
    )


def load_adapter(
    task: str,
    path: str,
    base_path: str,
    base_source: str,
    base: PreTrainedModel,
    task_type: AdapterTaskType = "SEQ_CLS",
) -> tuple[PreTrainedModel, dict[str, tuple[Tensor, Tensor]]]:
    """Load a LoRA adapter over the configured base.

    Args:
        task: Task name (for messages).
        path: The adapter directory.
        base_path: The configured base, resolved to a local path or hub id.
        base_source: The configured base as written in the config (for messages).
        base: The configured base (checked against the adapter's recorded base): a classifier's backbone
            (``SEQ_CLS``) or the causal LM (``CAUSAL_LM``).
        task_type: The experts' kind: the adapter is applied to a sequence classifier or a causal LM of
            the base (an adapter recording the other task type is refused).

    Returns:
        The classifier or causal LM with every densified update applied and plain LoRA layers removed
        (a plain Hugging Face model), and, per plain LoRA module of the merged part, its factors
        (A (r, in), s * B (out, r)); module names are relative to the backbone for a classifier, full
        names for a causal LM.
    """
    from peft import PeftConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise DivMergeError(
            f"Could not read the adapter of {task!r} at {path!r} ({first_line(err)}): point to a directory "
            "written by PeftModel.save_pretrained."
        ) from err
    if config.peft_type != "LORA":
        raise DivMergeError(
            f"Adapter {task!r} is a {config.peft_type} adapter; only LoRA adapters are merged as adapters: "
            "merge it into its base with merge_and_unload(), save_pretrained that model and use that."
        )
    if config.task_type not in (None, task_type):
        raise DivMergeError(
            f"Adapter {task!r} is a {config.task_type} adapter but the experts are merged as {task_type} "
            "models (LoRA adapters of sequence classifiers or of causal LMs, one kind per merge): merge it "
            "into its base with merge_and_unload(), save_pretrained that model and use its directory."
        )
    check_base(task, config, base_path, base_source, base, task_type)
    if task_type == "CAUSAL_LM":
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        prefix = ""  # every weight of a causal LM is merged
    else:
        weights = load_peft_weights(path, device="cpu")
        model = AutoModelForSequenceClassification.from_pretrained(
            base_path, num_labels=_num_labels(config, base_path, weights, task), dtype=torch.float32
        )
        prefix = model.base_model_prefix + "."  # only the backbone is merged
    try:
        peft_model = PeftModel.from_pretrained(model, path, adapter_name=_ADAPTER)
    except (RuntimeError, ValueError, KeyError) as err:
        raise DivMergeError(
            f"Adapter {task!r} does not fit the configured base {base_source!r} ({first_line(err)}): it was "
            f"trained on another base model ({config.base_model_name_or_path!r} in its {ADAPTER_CONFIG}); "
            "set model.base to the adapter's base."
        ) from err
    wrapped = peft_model.base_model.model
    names_of: dict[int, list[str]] = {}  # tensor id -> every name it has (two for tied embeddings)
    for name, param in wrapped.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    factors = {}
    for name, module in wrapped.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = getattr(module.get_base_layer(), "weight", None)
        tied = [n for n in names_of.get(id(weight), []) if not n.startswith(name + ".")]
        if tied:
            raise DivMergeError(
                f"Adapter {task!r} puts LoRA on {name!r}, whose weight is tied to {tied} (shared input and "
                "output embeddings), so its update cannot be merged exactly: train the adapter without that "
                "module in target_modules, or merge it into its base (merge_and_unload()), save_pretrained "
                "that model and use its directory."
            )
        if name.startswith(prefix) and _plain_lora(module):
            a = module.lora_A[_ADAPTER].weight.detach().clone()  # (r, in)
            b = module.lora_B[_ADAPTER].weight.detach() * module.scaling[_ADAPTER]  # (out, r)
            factors[name[len(prefix) :]] = (a, b)
        else:
            log.info("Adapter %r: densifying the LoRA update of %s (%s)", task, name, type(module).__name__)
            module.merge(adapter_names=[_ADAPTER])
    return peft_model.unload(), factors
