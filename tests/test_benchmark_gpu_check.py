"""benchmarks.gpu_check: without CUDA it refuses in one line; on --device cpu it makes its table."""

import json

import pytest
import torch

from benchmarks import gpu_check as gc
from tests import tiny_lm


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_without_a_gpu_it_says_so(capsys):
    assert gc.main([]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().out


def test_cpu_table_for_both_modes_under_bf16(tmp_path):
    base = tiny_lm.make_base(tmp_path / "base")
    expert = tiny_lm.fine_tune(
        base, tmp_path / "full", tiny_lm.make_csv(tmp_path / "a.csv", "first", 16, seed=0), steps=3
    )
    argv = ["--device", "cpu", "--precisions", "bf16-mixed", "--architecture", "none", "--batch_size", "2"]
    argv += ["--seq_len", "8", "--answer", "2", "--steps", "1", "--warmup", "0", "--base", str(base)]
    argv += ["--experts", f"{expert},{expert}", "--out_dir", str(tmp_path / "out")]
    assert gc.main(argv) == 0
    rows = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(r["precision"], r["mode"]) for r in rows] == [
        ("bf16-mixed", "whole"),
        ("bf16-mixed", "per_block"),
    ]
    assert all(r["step_s"] > 0 for r in rows)
    assert "| bf16-mixed | per_block |" in (tmp_path / "out" / "gpu_check.md").read_text()
