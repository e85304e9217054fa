import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import transformers

from tests import tiny_lm
from tests.tiny import make_setup

transformers.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """A tiny random base, two experts (2 and 3 classes) and a CSV per task; shared read-only."""
    return make_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def lm(tmp_path_factory) -> dict:
    """A tiny Qwen2 base and two experts fine-tuned on synthetic generative tasks; shared read-only."""
    return tiny_lm.make_setup(tmp_path_factory.mktemp("tiny_lm"))
