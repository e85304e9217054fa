"""benchmarks.lora_memory on a tiny random base: synthetic experts and one in-process measurement."""

import pytest

from benchmarks import lora_memory as lm
from divmerge.families import load_experts
from tests.tiny import make_base


def test_worker_measures_a_mixed_set_of_synthetic_experts(tmp_path):
    base = str(make_base(tmp_path / "base"))
    dirs = lm.write_experts(base, tmp_path, 2, 2, ["query", "value"])
    experts = {"f": dirs["full"][0], "l": dirs["lora"][1]}
    assert load_experts(base, experts).lora  # the adapter is kept as factors
    config = {"base": base, "experts": experts, "batch_size": 2, "seq_len": 8, "steps": 1, "warmup": 0}
    row = lm.run_worker({**config, "threads": 1})
    assert row["peak_mb"] >= row["load_peak_mb"] >= row["rss_import_mb"] > 0
    full_mb = sum(p.numel() for p in load_experts(base, {"f": dirs["full"][0]}).base.values()) * 4 / 1e6
    assert full_mb < row["stored_mb"] < 1.05 * full_mb  # one dense task vector + small LoRA factors
    assert row["step_s"] > 0


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit):
        lm.main(["--num_experts", "1"])
    assert "--num_experts must be at least 2" in capsys.readouterr().err
