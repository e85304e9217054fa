"""Experts whose vocabulary extends the base's: added tokens, or embedding rows padded to a multiple of 64.

A known pain of merging tools (FusionBench #215: 128,256 vs 128,320 rows; mergekit #47, #139, #342). The
merged embedding (and untied LM head) has as many rows as the largest expert. Rows the base has merge as
usual; an added row merges over the experts that have it: its base value is their mean, each of them
contributes its difference from that mean, the others nothing (so a token only one expert added keeps
that expert's row). This is sound only if the experts mean the same token by the same id: the
tokenizers must agree on every added token, which :func:`vocabulary` checks.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from divmerge.errors import DivMergeError
from divmerge.experts.adapters import is_adapter
from divmerge.experts.sources import load_config, resolve_source


@dataclass(frozen=True)
class Vocabulary:
    """The merged vocabulary of a base and its experts.

    Attributes:
        base_size: Embedding rows of the base.
        size: Embedding rows of the merge: the largest expert's (at least ``base_size``).
        sizes: Task -> that expert's embedding rows.
        tokenizer: Path of the tokenizer that knows every added token (the base's when none was added).
    """

    base_size: int
    size: int
    sizes: dict[str, int]
    tokenizer: str

    @property
    def extended(self) -> bool:
        """Whether some expert has rows the base lacks."""
        return self.size > self.base_size


def _rows(path: str) -> int | None:
    """``vocab_size`` of a model directory's config (None if it has none)."""
    config = load_config(path, "the model")
    size = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
    return int(size) if size else None


def vocabulary(base: str, experts: Mapping[str, str]) -> Vocabulary:
    """Read the experts' vocabulary sizes (configs only) and, where they extend the base, check tokenizers.

    Args:
        base: Path of the base model directory.
        experts: Task -> path of the expert's directory (a LoRA adapter keeps the base's vocabulary).

    Returns:
        The merged vocabulary.

    Raises:
        DivMergeError: If an expert has fewer rows than the base, or two experts' tokenizers disagree on
            an added token (the message names the first one).
    """
    base_size = _rows(base)
    if base_size is None:
        return Vocabulary(0, 0, {task: 0 for task in experts}, base)
    sizes = {
        task: base_size if is_adapter(path) else (_rows(path) or base_size) for task, path in experts.items()
    }
    for task, size in sizes.items():
        if size < base_size:
            raise DivMergeError(
                f"Expert {task!r} has a vocabulary of {size} tokens, fewer than the base's {base_size}: it "
                "was not fine-tuned from this base; set model.base to the model it was fine-tuned from."
            )
    size = max(sizes.values(), default=base_size)
    if size == base_size:
        return Vocabulary(base_size, size, sizes, base)
    seen: dict[int, tuple[str, str]] = {}  # added id -> (first task that names it, its token)
    largest, most = base, -1
    for task, rows in sizes.items():
        if rows == base_size:
            continue
        tokenizer = AutoTokenizer.from_pretrained(experts[task])
        if len(tokenizer) > most:
            largest, most = experts[task], len(tokenizer)
        for i in range(base_size, min(rows, len(tokenizer))):
            token = tokenizer.convert_ids_to_tokens(i)
            first = seen.setdefault(i, (task, token))
            if first[1] != token:
                raise DivMergeError(
                    f"Experts {first[0]!r} and {task!r} disagree on added token {i}: {first[1]!r} vs "
                    f"{token!r}. Experts are merged id by id, so they must add the same tokens in the same "
                    "order: add them identically when fine-tuning, or leave one of the experts out."
                )
    return Vocabulary(base_size, size, sizes, largest)


def tokenizer_source(base: str, experts: Mapping[str, str]) -> str:
    """The tokenizer to encode prompts and decode answers with: the base's, or one with every added token.

    Args:
        base: Source of the base model (see ``resolve_source``).
        experts: Task -> expert source; experts that cannot be resolved yet (a demo expert not built)
            are skipped, they keep the base's vocabulary.

    Returns:
        A local path (or the base's hub id).
    """
    paths = {}
    for task, source in experts.items():
        try:
            paths[task] = resolve_source(source)
        except DivMergeError:
            continue
    base_path = resolve_source(base)
    if not Path(base_path).is_dir() or not all(Path(p).is_dir() for p in paths.values()):
        return base_path  # hub ids: their configs are not read here
    return vocabulary(base_path, paths).tokenizer
