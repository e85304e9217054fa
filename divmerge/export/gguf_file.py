"""Export a merge of causal-LM experts as one GGUF file (llama.cpp's format), for llama.cpp and Ollama.

The file is written the way llama.cpp's ``convert_hf_to_gguf.py`` writes it, so that llama.cpp and
transformers (``from_pretrained(dir, gguf_file=GGUF_FILE)``) read it back: the architecture's metadata
(context and embedding length, block count, feed-forward length, head counts, rope base, RMS epsilon),
tensors under llama.cpp's names (the ``gguf`` package's own name map, the one transformers reads with;
for the ``llama`` architecture the query and key rows permuted as llama.cpp's rotary layout wants,
which transformers' loader undoes), and the tokenizer (byte-level BPE vocabulary, token types, merges,
special token ids, chat template). Tensors are converted and written one at a time from the merged
tensors, so no second copy of the model is built. The directory also holds an Ollama ``Modelfile``, a
model card and ``divmerge_export.json``; like every export it is written beside the target and renamed
into place, so a failed export leaves nothing.
"""

import contextlib
import json
import logging
import math
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from transformers import PretrainedConfig

from divmerge.core.merged_model import MergedModel
from divmerge.errors import DivMergeError
from divmerge.experts.sources import resolve_source
from divmerge.experts.vocab import tokenizer_source
from divmerge.export.common import (
    CARD_FILE,
    EXPORT_FILE,
    FORMAT_VERSION,
    atomic_dir,
    check_target,
    load_base_config,
    load_tokenizer,
    relative_files,
)
from divmerge.export.model_card import jsonable

GGUF_FILE = "model.gguf"
"""The GGUF file's name inside the export directory."""

MODELFILE = "Modelfile"
"""Ollama's recipe, beside the GGUF file: ``ollama create NAME -f Modelfile``."""

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
"""``--gguf_type`` choices: the type of every matrix (vectors such as norms and biases stay float32)."""

DEFAULT_GGUF_TYPE = "f16"
"""Half the size of f32 and close enough that greedy answers match (llama.cpp's converter's default)."""


@dataclass(frozen=True)
class _Architecture:
    """How one Hugging Face ``model_type`` maps onto a llama.cpp architecture."""

    name: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool  # llama.cpp's llama graph wants q/k rows in its (non-NeoX) rotary order


ARCHITECTURES = {
    "llama": _Architecture("llama", permute_qk=True),  # Llama, SmolLM / SmolLM2
    "qwen2": _Architecture("qwen2", permute_qk=False),
}
"""Hugging Face ``model_type`` -> llama.cpp architecture, for the ones this writer knows."""

# The pre-tokenizer regexes (tokenizer.json) of the byte-level BPE families llama.cpp names
# (tokenizer.ggml.pre); a plain ByteLevel pre-tokenizer is GPT-2's regex ("gpt2").
_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
}

# gguf.TokenType values (llama.cpp's token attributes)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def check_gguf(family: str | None, base_source: str, gguf_type: str) -> PretrainedConfig:
    """Refuse, before any heavy work, what the GGUF writer cannot write (one line each).

    Args:
        family: The expert family's name (``"causal_lm"``, ``"classification"``); None when not known yet.
        base_source: Source of the base model: its config says the architecture.
        gguf_type: ``--gguf_type``.

    Returns:
        The base model's config.
    """
    if gguf_type not in GGUF_TYPES:
        raise DivMergeError(f"--gguf_type {gguf_type!r} is unknown: use one of {', '.join(GGUF_TYPES)}.")
    if family is not None and family != "causal_lm":
        raise DivMergeError(
            f"GGUF export writes causal LMs, and this is a {family} merge (a GGUF file has no place for "
            "per-task heads): export it with --format hf."
        )
    config = load_base_config(resolve_source(base_source), base_source)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise DivMergeError(
            f"GGUF export writes causal LMs of architecture {' or '.join(sorted(ARCHITECTURES))}, not "
            f"{model_type!r} (the base {base_source!r}): export with --format hf (a causal LM can then be "
            "converted with llama.cpp's convert_hf_to_gguf.py)."
        )
    _hyperparameters(config, base_source)  # refuses what the metadata cannot say
    _pre_tokenizer(load_tokenizer(resolve_source(base_source), base_source))  # refuses other tokenizers
    return config


def export_gguf(
    merged: MergedModel,
    params: Mapping[str, Tensor],
    base_source: str,
    out_dir: str | Path,
    summary: Mapping[str, Any],
    overwrite: bool = False,
    gguf_type: str = DEFAULT_GGUF_TYPE,
    family: str = "causal_lm",
) -> Path:
    """Write the merged causal LM as ``out_dir/model.gguf`` with a Modelfile, a model card and metadata.

    Args:
        merged: The merged model of causal-LM experts.
        params: Every merged tensor by full name, e.g. ``merged.merged_params(table)``.
        base_source: Source of the base model: its config and tokenizer describe the file.
        out_dir: Target directory; created atomically.
        summary: Method, ``experts`` (task -> source), coefficient statistics, ...: recorded in
            ``divmerge_export.json`` and the model card.
        overwrite: Replace a non-empty ``out_dir`` (the old one is removed only once the new one is done).
        gguf_type: Type of the matrices: f32, f16, bf16 or q8_0 (a matrix whose rows are not a multiple
            of 32 stays f16 in q8_0, as llama.cpp does).
        family: The expert family's name (``ExpertSet.family``): other families than causal_lm are refused.

    Returns:
        The export directory.
    """
    import gguf

    out = Path(out_dir).expanduser().absolute()
    check_target(out, overwrite, base_source, summary)
    config = check_gguf(family, base_source, gguf_type)
    arch = ARCHITECTURES[config.model_type]
    tokenizer = load_tokenizer(tokenizer_source(base_source, summary.get("experts", {})), base_source)
    dense = merged.dense_params(params)  # LoRA experts' low-rank updates folded in (no copy otherwise)
    tensors = _tensor_plan(dense, arch, config, gguf_type)
    vocab_rows = int(dense[_embedding_name(dense)].shape[0])
    with atomic_dir(out) as tmp:
        writer = gguf.GGUFWriter(tmp / GGUF_FILE, arch.name)
        try:
            _add_metadata(writer, out.name, config, base_source, gguf_type, vocab_rows)
            _add_tokenizer(writer, tokenizer, config, vocab_rows)
            for name, (_, shape, qtype) in tensors.items():  # declared first: the header lists them all
                nbytes = math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))
                writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, (source, _, qtype) in tensors.items():  # one tensor in memory at a time
                writer.write_tensor_data(_convert(dense[source], name, arch, config, qtype))
        finally:
            writer.close()
        eos = tokenizer.eos_token or ""
        (tmp / MODELFILE).write_text(_modelfile(eos), encoding="utf-8")
        card = _card(out, base_source, merged.task_names, summary, gguf_type)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        info = {
            "format": "divmerge-export",
            "version": FORMAT_VERSION,
            "kind": "causal_lm",
            "file_format": "gguf",
            "gguf_file": GGUF_FILE,
            "gguf_type": gguf_type,
            "gguf_architecture": arch.name,
            "base_source": base_source,
            "task_names": list(merged.task_names),
            "tasks": {},  # no per-task heads: the merged model answers every task
            "summary": jsonable(summary),
        }
        info["files"] = sorted([*relative_files(tmp), EXPORT_FILE])
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------ metadata


def _rope_theta(config: PretrainedConfig) -> float:
    """The rotary base, from ``rope_parameters`` (transformers 5) or ``rope_theta``."""
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10_000.0)


def _hyperparameters(config: PretrainedConfig, base_source: str) -> dict[str, Any]:
    """The architecture's numbers the GGUF metadata carries; refuses settings it cannot carry."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    problems = []
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope scaling {rope.get('rope_type')!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation {config.hidden_act!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("attention or MLP biases")  # a llama GGUF has none (transformers would drop them)
    if getattr(config, "use_sliding_window", False):
        problems.append("sliding-window attention")
    if config.model_type == "qwen2" and head_dim * heads != config.hidden_size:
        problems.append(f"head_dim {head_dim} != hidden_size / heads")
    if problems:
        raise DivMergeError(
            f"GGUF export cannot describe {problems[0]} of the base {base_source!r} in llama.cpp's "
            f"{config.model_type} metadata: export with --format hf and convert with llama.cpp."
        )
    return {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": heads,
        "head_count_kv": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "rope_freq_base": _rope_theta(config),
        "rms_eps": float(config.rms_norm_eps),
    }


def _add_metadata(
    writer: Any, name: str, config: PretrainedConfig, base_source: str, gguf_type: str, vocab_rows: int
) -> None:
    """general.* and the architecture's keys, as convert_hf_to_gguf.py writes them."""
    import gguf

    h = _hyperparameters(config, base_source)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_description(f"divmerge merge of experts fine-tuned from {base_source}")
    writer.add_context_length(h["context_length"])
    writer.add_embedding_length(h["embedding_length"])
    writer.add_block_count(h["block_count"])
    writer.add_feed_forward_length(h["feed_forward_length"])
    writer.add_head_count(h["head_count"])
    writer.add_head_count_kv(h["head_count_kv"])
    writer.add_rope_freq_base(h["rope_freq_base"])
    writer.add_layer_norm_rms_eps(h["rms_eps"])
    writer.add_rope_dimension_count(h["head_dim"])
    if h["head_dim"] * h["head_count"] != h["embedding_length"]:
        writer.add_key_length(h["head_dim"])
        writer.add_value_length(h["head_dim"])
    writer.add_vocab_size(vocab_rows)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) of a byte-level BPE tokenizer's splitting; refuses others."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    last = steps[-1] if steps else {}
    name = None
    if model.get("type") == "BPE" and last.get("type") == "ByteLevel" and not last.get("add_prefix_space"):
        first = steps[0]
        if len(steps) == 1 and last.get("use_regex", True):
            name = "gpt2"
        elif len(steps) == 2 and first.get("type") == "Digits" and first.get("individual_digits"):
            name = "smollm" if last.get("use_regex", True) else None
        elif len(steps) == 2 and first.get("type") == "Split" and not last.get("use_regex", True):
            name = _SPLIT_REGEXES.get((first.get("pattern") or {}).get("Regex"))
    if name is None:
        raise DivMergeError(
            f"GGUF export writes byte-level BPE tokenizers of known splitting (gpt2, smollm, qwen2, "
            f"llama-bpe), and the base's {type(tokenizer).__name__} is not one: export with --format hf "
            "and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    return name


def _add_tokenizer(writer: Any, tokenizer: Any, config: PretrainedConfig, vocab_rows: int) -> None:
    """Vocabulary, token types, merges, special ids, add-BOS/EOS flags and chat template.

    Tokens and types follow convert_hf_to_gguf.py's ``get_vocab_base``: ids the tokenizer lacks (rows
    the embedding has beyond it) become ``[PAD<i>]`` tokens of type unused, added special tokens are
    control tokens, other added tokens user-defined. Merges, special ids and the chat template are read
    by the ``gguf`` package's own ``SpecialVocab`` from the tokenizer saved to a temporary directory.
    """
    import gguf

    pre = _pre_tokenizer(tokenizer)
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_rows):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        tokens.append(reverse[i])
        types.append(_NORMAL if i not in added else _CONTROL if added[i].special else _USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="divmerge-gguf-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        config.to_json_file(Path(tmp) / "config.json")
        with _quiet_gguf():  # e.g. "special token unk out of range": ids it skips are absent on purpose
            special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_rows)
    probe = tokenizer("a")["input_ids"]  # whether encoding adds BOS / EOS, as the tokenizer does it
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bool(probe) and bos is not None and probe[0] == bos
    special.add_special_token["eos"] = bool(probe) and eos is not None and probe[-1] == eos
    special.add_to_gguf(writer, quiet=True)


@contextlib.contextmanager
def _quiet_gguf() -> Iterator[None]:
    """Silence the ``gguf`` package's info and warning logging for the block."""
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------------- tensors


def _embedding_name(dense: Mapping[str, Tensor]) -> str:
    name = next((n for n in dense if n.endswith("embed_tokens.weight")), None)
    if name is None:
        raise DivMergeError(
            "The merged model has no token embedding (...embed_tokens.weight): GGUF export needs a whole "
            "causal LM's tensors; pass MergedModel.merged_params for experts of a llama or qwen2 base."
        )
    return name


def _tensor_plan(
    dense: Mapping[str, Tensor], arch: _Architecture, config: PretrainedConfig, gguf_type: str
) -> dict[str, tuple[str, tuple[int, ...], Any]]:
    """GGUF name -> (merged tensor name, shape, GGML type) for every merged tensor, in file order."""
    import gguf

    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.name)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    plan = {}
    for source, tensor in dense.items():
        stem, dot, suffix = source.rpartition(".")
        target = names.get_name(stem) if dot else None
        if target is None:
            raise DivMergeError(
                f"Merged tensor {source!r} has no name in llama.cpp's {arch.name} layout: the experts do "
                f"not match the base's {config.model_type} architecture; export with --format hf."
            )
        shape = tuple(tensor.shape)
        plan[f"{target}.{suffix}"] = (source, shape, _qtype(shape, gguf_type))
    return dict(sorted(plan.items(), key=lambda item: _file_order(item[0])))


def _file_order(name: str) -> tuple[int, int, str]:
    """llama.cpp's order: token embedding, blocks by index, then output norm and head."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def _qtype(shape: tuple[int, ...], gguf_type: str) -> Any:
    """One tensor's GGML type: vectors F32, q8_0 matrices of rows not in whole 32-blocks F16 (as llama.cpp).

    Args:
        shape: The tensor's shape.
        gguf_type: ``--gguf_type``.
    """
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) < 2 or gguf_type == "f32":
        return types.F32
    if gguf_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0]:
        return types.F16
    return {"f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[gguf_type]


def _convert(
    tensor: Tensor, name: str, arch: _Architecture, config: PretrainedConfig, qtype: Any
) -> np.ndarray:
    """One merged tensor as the bytes llama.cpp reads: permuted (llama q/k) and converted to ``qtype``."""
    import gguf

    data = tensor.detach().to("cpu").float().numpy()  # (out, in) for matrices
    if arch.permute_qk and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config.num_attention_heads
        if name.endswith("attn_k.weight"):
            heads = getattr(config, "num_key_value_heads", None) or heads
        data = _permute(data, heads)
    return gguf.quants.quantize(np.ascontiguousarray(data), qtype)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rotary halves interleaved (rows only)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# -------------------------------------------------------------------------------------- card, Modelfile


def _modelfile(eos: str) -> str:
    stop = f'PARAMETER stop "{eos}"\n' if eos else ""
    return (
        f"# ollama create merged -f Modelfile && ollama run merged\n"
        f"FROM ./{GGUF_FILE}\n"
        "# the chat template comes from the file's tokenizer.chat_template\n"
        "PARAMETER temperature 0\n"
        f"{stop}"
    )


def _card(out: Path, base_source: str, tasks: list[str], summary: Mapping[str, Any], gguf_type: str) -> str:
    """A short model card: what was merged and how to run the file."""
    experts = summary.get("experts", {})
    lines = [f"- `{task}`: `{experts.get(task, '')}`" for task in tasks]
    return (
        f"# {out.name}\n\n"
        f"A {summary.get('method', 'merge')} of {len(tasks)} causal-LM experts fine-tuned from "
        f"`{base_source}`, made with divmerge (DivMerge, arXiv 2509.02108), as one GGUF file "
        f"(`{GGUF_FILE}`, matrices {gguf_type}).\n\n"
        "## Experts\n\n" + "\n".join(lines) + "\n\n"
        "## How to run\n\n"
        "llama.cpp:\n\n"
        "```sh\n"
        f"llama-cli -m {out.name}/{GGUF_FILE} -cnv --temp 0\n"
        "```\n\n"
        f"Ollama (`{MODELFILE}` is in this directory):\n\n"
        "```sh\n"
        f"cd {out.name} && ollama create {out.name.lower()} -f {MODELFILE} && ollama run {out.name.lower()}\n"
        "```\n\n"
        "transformers (dequantised to float32):\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{out.name}", gguf_file="{GGUF_FILE}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{out.name}", gguf_file="{GGUF_FILE}")\n'
        "```\n\n"
        f"`{EXPORT_FILE}` records the merge summary and every file.\n"
    )
