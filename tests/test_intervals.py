"""Bootstrap intervals of ANP over test rows: the math, the per-row record across processes, the outputs."""

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from divmerge.evaluation import TaskResult, anp, anp_interval, format_table, write_report
from divmerge.families.base import RowCorrectness
from divmerge.intervals import mean_ratio_interval
from tests.test_cli import write_config


def rows(n: int, expert: float, kept: float, seed: int = 0) -> dict[str, np.ndarray]:
    """A task's rows: the expert right with probability ``expert``, the merge keeping ``kept`` of those."""
    rng = np.random.default_rng(seed)
    right = rng.random(n) < expert
    return {"expert": right, "merged": right & (rng.random(n) < kept)}


def results(per_task: dict[str, dict[str, np.ndarray]]) -> list[TaskResult]:
    return [
        TaskResult(t, len(r["expert"]), float(r["expert"].mean()), float(r["merged"].mean()), rows=r)
        for t, r in per_task.items()
    ]


def width(n: int) -> float:
    interval = anp_interval(results({t: rows(n, 0.8, 0.9, seed=i) for i, t in enumerate("ab")}))
    return interval.high - interval.low


def test_interval_contains_the_point_estimate():
    res = results({t: rows(500, 0.85, 0.93, seed=i) for i, t in enumerate("abcd")})
    interval = anp_interval(res)
    assert interval.low < anp(res) < interval.high
    assert 0.005 < interval.high - interval.low < 0.1
    assert (interval.level, interval.resamples, interval.seed, interval.method) == (
        0.95,
        2000,
        0,
        "percentile",
    )


def test_interval_narrows_as_rows_grow():
    small, large = width(50), width(5000)
    assert large < small / 4  # about 1 / sqrt(100)


def test_all_rows_right_give_a_zero_width_interval_at_one():
    every = {"expert": np.ones(40, dtype=bool), "merged": np.ones(40, dtype=bool)}
    interval = anp_interval(results({"a": every, "b": every}))
    assert (interval.low, interval.high) == (1.0, 1.0)


def test_the_interval_is_a_function_of_the_rows_and_the_seed():
    res = results({t: rows(100, 0.7, 0.8, seed=i) for i, t in enumerate("ab")})
    assert anp_interval(res) == anp_interval(res)
    assert anp_interval(res, seed=1) != anp_interval(res)


def test_expert_and_merge_are_resampled_as_pairs():
    """A merge right on exactly the expert's rows keeps ratio 1 on every resample of them."""
    same = rows(60, 0.5, 1.0)
    assert not same["expert"].all() and (same["merged"] == same["expert"]).all()
    interval = anp_interval(results({"a": same}))
    assert (interval.low, interval.high) == (1.0, 1.0)


def test_zero_experts_and_missing_rows_follow_anp():
    good, zero = rows(80, 0.8, 0.9), {"expert": np.zeros(80, dtype=bool), "merged": np.ones(80, dtype=bool)}
    both = results({"a": good, "b": zero})
    assert anp_interval(both) == anp_interval(results({"a": good}))  # b is left out, as anp() leaves it out
    assert anp_interval([TaskResult("a", 80, 0.8, 0.7)]) is None  # rows not kept: no interval
    assert mean_ratio_interval({}, []) is None


def test_rows_are_kept_in_row_order_whatever_the_batch_order():
    metric = RowCorrectness()
    metric.update(torch.tensor([1.0, 0.0]), torch.tensor([3, 1]))
    metric.update(torch.tensor([True, False, True]), torch.tensor([0, 4, 2]))
    assert metric.compute().tolist() == [1, 0, 1, 1, 0]


def _share_rows(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    right = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.uint8)  # 8 rows on 3 processes: 3, 3, 2
    metric = RowCorrectness()
    mine = torch.arange(rank, 8, world)  # UnrepeatedDistributedSampler's share
    for batch in mine.split(2):
        metric.update(right[batch], batch)
    gathered = metric.compute()
    if rank == 0:
        Path(out).write_text(json.dumps(gathered.tolist()))
    dist.destroy_process_group()


def test_rows_are_gathered_from_every_process(tmp_path):
    out = tmp_path / "rows.json"
    # fork: the children need nothing re-imported (their tensor ops are too small for thread pools)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_share_rows, args=(3, init, str(out)), nprocs=3, start_method="fork")
    assert json.loads(out.read_text()) == [1, 0, 1, 1, 0, 0, 1, 0]


def test_table_and_report_carry_the_interval_and_keep_every_other_cell(tmp_path):
    res = [
        *results({t: rows(200, 0.8, 0.9, seed=i) for i, t in enumerate("ab")}),
        TaskResult("c", 200, 0.5, 0.6, held_out=True, rows=rows(200, 0.5, 1.0, seed=5)),
    ]
    res = [
        TaskResult(r.task, r.examples, r.expert, r.merged, r.merged * 0.9, r.held_out, r.rows) for r in res
    ]
    for r in res:
        r.rows["reference"] = r.rows["merged"]  # the reference column's rows
    plain = format_table(
        [TaskResult(r.task, r.examples, r.expert, r.merged, r.reference, r.held_out) for r in res]
    )
    table = format_table(res)
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()]
    assert cells[2:5] == [[c.strip() for c in line.split("|")[1:-1]] for line in plain.splitlines()[2:5]]
    interval = anp_interval(res)
    assert cells[5][4] == f"{anp(res):.4f} [{interval.low:.4f}, {interval.high:.4f}]"
    assert re.fullmatch(r"\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]", cells[5][3])  # the reference merge's
    assert cells[6][0] == "held-out vs base" and "[" in cells[6][4]
    report = json.loads(write_report(res, tmp_path, "test").with_suffix(".json").read_text())
    assert report["anp_ci"] == interval.as_dict() and report["anp_ci"]["low"] < report["anp"]
    assert report["reference_anp_ci"]["high"] > 0 and report["held_out_anp_ci"]["level"] == 0.95
    assert "rows" not in report["tasks"][0]


def test_a_test_run_prints_and_reports_the_intervals(tmp_path, tiny, capsys):
    train.main(["test", "--config", write_config(tmp_path, tiny, epochs=1), "--model.method", "ties"])
    out = capsys.readouterr().out
    anp_line = next(line for line in out.splitlines() if line.startswith("| ANP"))
    cells = [c.strip() for c in anp_line.split("|")[1:-1]]
    interval = r"\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]"
    assert re.fullmatch(interval, cells[3]) and re.fullmatch(interval, cells[4])  # task arithmetic, merged
    report = json.loads(next((tmp_path / "run").rglob("report_test.json")).read_text())
    for key in ("anp", "reference_anp"):
        ci = report[f"{key}_ci"]
        assert ci["low"] <= ci["high"] and (ci["level"], ci["resamples"], ci["seed"]) == (0.95, 2000, 0)
        assert cells[4 if key == "anp" else 3] == f"{report[key]:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]"
    assert report["held_out_anp_ci"] is None
    assert all(r["examples"] == 8 for r in report["tasks"])
