"""benchmarks.step_cost on tiny random experts: timers, tables, the memory subprocess, bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import step_cost as sc
from benchmarks.common.experts import load_synthetic_experts
from divmerge.core.merged_model import MergedModel
from tests.tiny import make_setup

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return make_setup(tmp_path_factory.mktemp("step_cost"), {"a": 2, "b": 3})


@pytest.fixture(scope="module")
def tiny_merged(setup):
    experts = load_synthetic_experts(setup["base"], setup["experts"], 3)  # one synthetic expert
    merged = MergedModel(experts, "layer")
    batches = sc.make_batches(None, experts.task_names, 4, 16, sc.vocab_size_of(experts))
    return experts, merged, batches


def test_synthesize_extends_every_field(tiny_merged):
    experts, _, _ = tiny_merged
    assert experts.task_names == ["a", "b", "a~2"]
    assert experts.num_labels == [2, 3, 2]
    assert len(experts.heads) == len(experts.skeletons) == len(experts.task_digests) == 3
    for tau in experts.task_vectors.values():
        assert tau.shape[0] == 3
        assert not torch.equal(tau[2], tau[0]) or tau.abs().max() == 0  # noise was added
    assert len(set(experts.task_digests)) == 3


def test_timing_functions_return_positive_seconds(setup, tiny_merged):
    _, merged, batches = tiny_merged
    teachers = sc.teacher_logprobs(merged, batches)
    assert [teachers[t].shape for t in batches] == [(4, 2), (4, 3), (4, 2)]
    model = sc.plain_model(setup["base"])
    assert sc.plain_step_time(model, batches, steps=2, warmup=1) > 0
    assert sc.divmerge_step_time(merged, batches, teachers, steps=2, warmup=1) > 0
    assert sc.divmerge_step_time(merged, batches, teachers, steps=1, warmup=0, backbone_pass="joint") > 0
    assert sc.naive_step_time(merged, batches, steps=2, warmup=1) > 0
    phases = sc.divmerge_phase_times(merged, batches, teachers, steps=1, warmup=0)
    assert set(phases) == {"merge", "tasks fwd+bwd", "merge_backward", "optimizer"}
    assert all(v > 0 for v in phases.values())
    assert set(sc.plain_phase_times(model, batches, steps=1, warmup=0)) == {
        "forward",
        "loss",
        "backward",
        "optimizer",
    }


def test_divmerge_step_trains_only_the_coefficients(tiny_merged):
    _, merged, batches = tiny_merged
    teachers = sc.teacher_logprobs(merged, batches)
    before = merged.coefficients.weight.detach().clone()
    base_before = {n: t.clone() for n, t in merged.base.items()}
    sc.make_divmerge_step(merged, batches, teachers)()
    assert not torch.equal(before, merged.coefficients.weight)
    assert all(torch.equal(base_before[n], t) for n, t in merged.base.items())


def test_format_table_columns_and_cells():
    rows = [{"T": 2, "plain s": 0.5, "divmerge s": 0.55, "ratio": 1.1}, {"T": 4, "ratio": 12.345}]
    table = sc.format_table(rows, ["T", "plain s", "divmerge s", "ratio"])
    lines = table.splitlines()
    assert lines[0] == "| T | plain s | divmerge s | ratio |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| 2 | 0.500 | 0.550 | 1.100 |"
    assert lines[3] == "| 4 |  |  | 12.3 |"


def test_add_increments_per_dtype_and_pass():
    rows = [
        {"dtype": "float32", "T": 2, "peak_mb": 1000.0, "load_peak_mb": 900.0},
        {"dtype": "float32", "T": 4, "peak_mb": 1200.0, "load_peak_mb": 1100.0},
        {"dtype": "bfloat16", "T": 2, "peak_mb": 950.0, "load_peak_mb": 900.0},
        {"dtype": "float32", "pass": "joint", "T": 3, "peak_mb": 990.0},
        {"dtype": "float32", "pass": "joint", "T": 4, "peak_mb": 1300.0},
    ]
    sc.add_increments(rows)
    assert rows[4]["d_peak_mb"] == 310.0
    assert rows[1]["d_peak_mb"] == 100.0
    assert rows[1]["d_load_peak_mb"] == 100.0
    assert "d_rss_after_load_mb" not in rows[1]  # missing figures are skipped
    assert "d_peak_mb" not in rows[0] and "d_peak_mb" not in rows[2]


def _worker_config(setup, kind: str) -> dict:
    return {
        "kind": kind,
        "base": setup["base"],
        "experts": setup["experts"],
        "num_tasks": 3,
        "dtype": "bfloat16",
        "steps": 1,
        "warmup": 0,
        "batch_size": 2,
        "seq_len": 8,
    }


def test_memory_subprocess_reports_positive_mb(setup):
    res = sc.measure_in_subprocess(_worker_config(setup, "divmerge"), timeout=120)
    assert res["peak_mb"] > 0 and res["step_s"] > 0
    assert res["peak_mb"] >= res["load_peak_mb"] >= res["rss_import_mb"] > 0
    assert res["synthetic"] == 1
    # 3 bf16 task vectors of the tiny model: 2 bytes per merged number
    assert res["task_vector_mb"] == pytest.approx(
        sum(t.numel() for t in load_synthetic_experts(setup["base"], setup["experts"], 1).base.values())
        * 2
        / 1e6
    )


def test_plain_worker_in_process(setup):
    res = sc.run_worker(_worker_config(setup, "plain"))
    assert res["peak_mb"] > 0 and res["step_s"] > 0 and res["rss_after_load_mb"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--T", "9", "--max_T", "8"], "step_cost: error: T=9 is outside 1..max_T=8"),
        (["--tasks", "rt", "nope"], "step_cost: error: unknown task 'nope'"),
        (["--steps", "0"], "step_cost: error: --steps must be at least 1"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        sc.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1


def test_bad_input_from_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_cost", "--T", "12"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "step_cost: error: T=12 is outside 1..max_T=8: raise --max_T or lower --T"
    ]


def test_step_cost_rows_on_tiny_experts(setup):
    rows, last = sc.step_cost_rows(
        setup["base"],
        setup["experts"],
        [2, 3],
        steps=1,
        warmup=0,
        batch_size=2,
        seq_len=8,
        log=lambda s: None,
    )
    assert [r["T"] for r in rows] == [2, 3] and last["T"] == 3
    expected = ["T", "rows/step", "plain s", "divmerge s", "ratio", "joint s", "ratio(joint)", "naive s"]
    assert list(rows[0])[: len(expected)] == expected
    assert all(r[c] > 0 for r in rows for c in expected)
    table = sc.format_table(rows, list(rows[0])).splitlines()
    assert table[0].startswith("| T | rows/step | plain s | divmerge s | ratio |") and len(table) == 4
