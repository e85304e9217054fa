"""benchmarks.per_block_memory on a tiny Qwen2 base: both modes' workers and the whole table."""

import json

from benchmarks import per_block_memory as pb
from tests.test_lora_causal import setup  # noqa: F401  (a tiny Qwen2 base, a full expert, a LoRA adapter)

CONFIG = {"batch_size": 2, "seq_len": 8, "answer": 2, "steps": 1, "warmup": 0, "threads": 1}


def test_workers_measure_each_mode_and_the_table_is_written(setup, tmp_path):  # noqa: F811
    experts = {"first": setup["full"], "has_a": setup["plain"]}
    config = {**CONFIG, "base": setup["base"], "experts": experts}
    rows = {mode: pb.run_worker({**config, "job": mode}) for mode in ("whole", "per_block")}
    assert rows["whole"]["storage_mb"] == rows["per_block"]["storage_mb"] > 0
    assert 0 < rows["per_block"]["block_mb"] < rows["per_block"]["merged_mb"]
    assert all(r["rss_loaded_mb"] > 0 and r["step_peak_mb"] >= 0 for r in rows.values())
    times = pb.run_worker({**config, "job": "time"})
    assert times.keys() == {"whole", "per_block"} and min(times.values()) > 0
    args = [f"--{k}={v}" for k, v in CONFIG.items()]
    assert (
        pb.main(
            [
                *args,
                "--base",
                setup["base"],
                "--experts",
                f"{setup['full']},{setup['plain']}",
                "--out_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    table = json.loads((tmp_path / "per_block_memory.json").read_text())
    assert [r["mode"] for r in table] == ["whole", "per_block"] and table[0]["x_step"] == 1.0
    assert "| per_block |" in (tmp_path / "per_block_memory.md").read_text()
