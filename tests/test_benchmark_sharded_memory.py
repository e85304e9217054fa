"""benchmarks.sharded_memory on a tiny Qwen2 base: 2 gloo processes, per block, bf16, the joint pass."""

import json

from benchmarks import sharded_memory as sm
from tests import tiny_lm


def test_two_ranks_store_half_and_agree_on_the_coefficients(tmp_path):
    base = tiny_lm.make_base(tmp_path / "base")
    expert = tiny_lm.fine_tune(
        base, tmp_path / "full", tiny_lm.make_csv(tmp_path / "a.csv", "first", 16, seed=0), steps=3
    )
    flags = ["--batch_size=2", "--seq_len=8", "--answer=2", "--steps=1", "--warmup=0", "--ranks=2"]
    experts = f"{expert},{expert}"  # the same full expert twice: T = 2, all of it sharded
    argv = [
        *flags,
        "--modes=per_block",
        "--precision=bf16-mixed",
        "--backbone_pass=joint",
        "--base",
        str(base),
        "--experts",
        experts,
        "--out_dir",
        str(tmp_path),
    ]
    assert sm.main(argv) == 0
    (row,) = json.loads((tmp_path / "sharded_memory.json").read_text())
    assert row["ranks"] == 2 and row["mode"] == "per_block"
    assert abs(row["stored_mb"] - row["total_mb"] / 2) < 0.01 * row["total_mb"]  # each rank keeps half
    assert row["coef_spread"] == 0.0  # the ranks step identically
    assert "load_peak_mb" in row and "| load_peak_mb |" in (tmp_path / "sharded_memory.md").read_text()
    assert 0 < row["block_mb"] < row["merged_mb"] and row["step_s"] > 0
    assert "| 2 | per_block |" in (tmp_path / "sharded_memory.md").read_text()
