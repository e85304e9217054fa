"""Hub ids that are neither local, cached nor reachable fail fast, in one line."""

import time

import pytest
from huggingface_hub import constants
from transformers import AutoModel

from divmerge.errors import DivMergeError
from divmerge.experts.sources import load_pretrained
from divmerge.hub import check_available


def test_offline_and_not_cached_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DivMergeError, match=r"'someone/no-such-model-here' is a hub id .*offline mode is on"):
        load_pretrained(AutoModel, "someone/no-such-model-here", "the base model")
    assert time.perf_counter() - start < 5


def test_unreachable_hub_fails_after_one_bounded_request(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # loopback, nothing listens: refused at once
    start = time.perf_counter()
    with pytest.raises(DivMergeError, match="the hub did not serve it"):
        check_available("someone/no-such-model-here", "model", "the base model")
    assert time.perf_counter() - start < 15
