"""Hub ids, fast: one clear line when a model or dataset is neither local, cached, nor reachable.

Without this, an id that is not cached fails only after huggingface_hub's retries (about a minute
with no network). The local Hugging Face cache is checked first; with the hub switched off
(``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE``) an id missing from the cache
is refused at once, naming the variable; otherwise one bounded request decides.
"""

import os
from typing import Literal

from huggingface_hub import HfApi, try_to_load_from_cache

from divmerge.errors import DivMergeError, first_line

PROBE_TIMEOUT_S = 5.0
_OFFLINE_VARS = {
    "model": ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"),
    "dataset": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
}


def _offline(repo_type: str) -> str | None:
    """The first environment variable that switches the hub off for ``repo_type``, or None."""
    on = ("1", "true", "yes", "on")
    return next((v for v in _OFFLINE_VARS[repo_type] if os.environ.get(v, "").strip().lower() in on), None)


def check_available(repo_id: str, repo_type: Literal["model", "dataset"], what: str) -> None:
    """Refuse, fast and in one line, a hub id that is not cached and cannot be fetched.

    Args:
        repo_id: The hub id.
        repo_type: ``model`` or ``dataset``.
        what: How to name it, e.g. ``"the base model"`` or ``"task 'rt'"``.
    """
    marker = "config.json" if repo_type == "model" else "README.md"
    if isinstance(try_to_load_from_cache(repo_id, marker, repo_type=repo_type), str):
        return  # cached: loads offline too
    offline = _offline(repo_type)
    if offline:
        raise DivMergeError(
            f"{what.capitalize()} {repo_id!r} is a hub id not in the Hugging Face cache, and offline mode "
            f"is on ({offline}=1): give a local path, or unset {offline} (with network access) to fetch it."
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    info = api.model_info if repo_type == "model" else api.dataset_info
    try:
        info(repo_id, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # no network, unknown id, gated repo: all end the same way
        raise DivMergeError(
            f"{what.capitalize()} {repo_id!r} is not a local path, not in the Hugging Face cache, and the "
            f"hub did not serve it ({type(err).__name__}: {first_line(err)}): give a local path, or check "
            "the id and the network."
        ) from err
