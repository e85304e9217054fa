"""Imported for its effect: the benchmarks that load models run offline and quiet unless told otherwise."""

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
