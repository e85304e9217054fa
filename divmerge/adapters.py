"""Read a peft LoRA adapter directory over the configured base into a classifier plus LoRA factors.

An adapter expert is the configured base model with the adapter applied (peft ``PeftModel``). Its plain
LoRA layers on ``nn.Linear`` / ``Conv1D`` backbone modules are kept as factors (A, s * B), never
densified (see ``divmerge.lora``). Everything else the adapter changes is returned as ordinary weights
of a plain Hugging Face model, i.e. densified: LoRA on other layer types (embeddings, convolutions,
``nn.MultiheadAttention``, ``target_parameters``), LoRA variants that are not a plain low-rank sum
(DoRA and the others in peft's ``lora_variants``, ``lora_bias``), LoRA layers inside the classifier,
and the ``modules_to_save`` copies (for a SEQ_CLS adapter, the classifier: that expert's head).
"""

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PreTrainedModel

from divmerge.errors import DivMergeError

if TYPE_CHECKING:  # peft is imported where adapters are loaded: importing it costs seconds
    from peft import PeftConfig
    from peft.tuners.lora import LoraLayer

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER = "default"  # the adapter name PeftModel.from_pretrained loads under
_PEFT_PREFIX = "base_model.model."  # where peft saves the wrapped model's tensors


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a local peft adapter directory (holds ``adapter_config.json``)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def _first_line(err: BaseException) -> str:
    """The first line of an error, and its second when the first ends in a colon (a heading)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


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
        f"{config.modules_to_save})."
    )


def check_base(
    task: str, config: "PeftConfig", base_path: str, base_source: str, base: PreTrainedModel
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
        base: The configured base model.
    """
    recorded = config.base_model_name_or_path
    path = Path(recorded).expanduser() if recorded else None
    if path is None or not path.is_dir() or path.resolve() == Path(base_path).expanduser().resolve():
        return
    other = AutoModel.from_pretrained(path, dtype=torch.float32)
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
    task: str, path: str, base_path: str, base_source: str, base: PreTrainedModel
) -> tuple[PreTrainedModel, dict[str, tuple[Tensor, Tensor]]]:
    """Load a LoRA adapter over the configured base.

    Args:
        task: Task name (for messages).
        path: The adapter directory.
        base_path: The configured base, resolved to a local path or hub id.
        base_source: The configured base as written in the config (for messages).
        base: The configured base backbone (checked against the adapter's recorded base).

    Returns:
        The classifier with every densified update applied and plain LoRA layers removed (a plain
        Hugging Face model), and, per plain LoRA module of the backbone (name relative to the backbone),
        its factors (A (r, in), s * B (out, r)).
    """
    from peft import PeftConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise DivMergeError(
            f"Could not read the adapter of {task!r} at {path!r} ({_first_line(err)}): point to a directory "
            "written by PeftModel.save_pretrained."
        ) from err
    if config.peft_type != "LORA":
        raise DivMergeError(
            f"Adapter {task!r} is a {config.peft_type} adapter; only LoRA adapters are merged as adapters: "
            "merge it into its base with merge_and_unload(), save_pretrained that model and use that."
        )
    if config.task_type not in (None, "SEQ_CLS"):
        raise DivMergeError(
            f"Adapter {task!r} is a {config.task_type} adapter; divmerge merges LoRA adapters of sequence "
            "classifiers (task_type SEQ_CLS): merge it into its base with merge_and_unload(), "
            "save_pretrained that model and use its directory."
        )
    check_base(task, config, base_path, base_source, base)
    weights = load_peft_weights(path, device="cpu")
    model = AutoModelForSequenceClassification.from_pretrained(
        base_path, num_labels=_num_labels(config, base_path, weights, task), dtype=torch.float32
    )
    try:
        peft_model = PeftModel.from_pretrained(model, path, adapter_name=_ADAPTER)
    except (RuntimeError, ValueError, KeyError) as err:
        raise DivMergeError(
            f"Adapter {task!r} does not fit the configured base {base_source!r} ({_first_line(err)}): it was "
            f"trained on another base model ({config.base_model_name_or_path!r} in its {ADAPTER_CONFIG}); "
            "set model.base to the adapter's base."
        ) from err
    prefix = model.base_model_prefix + "."
    factors = {}
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if name.startswith(prefix) and _plain_lora(module):
            a = module.lora_A[_ADAPTER].weight.detach().clone()  # (r, in)
            b = module.lora_B[_ADAPTER].weight.detach() * module.scaling[_ADAPTER]  # (out, r)
            factors[name[len(prefix) :]] = (a, b)
        else:
            log.info("Adapter %r: densifying the LoRA update of %s (%s)", task, name, type(module).__name__)
            module.merge(adapter_names=[_ADAPTER])
    return peft_model.unload(), factors
