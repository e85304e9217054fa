"""Tests of benchmarks.merge_quality on tiny random models (fast)."""

import csv
import dataclasses
import itertools
import math
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import merge_quality as mq
from divmerge.core.merged_model import MergedModel
from divmerge.data import TaskSpec
from divmerge.families import load_experts
from divmerge.families.classification import task_logits
from divmerge.lightning.datamodule import MergeDataModule
from divmerge.static import static_merge
from tests.tiny import make_setup

TASKS = {"a": 2, "b": 3, "c": 2}
NUM_TEST, NUM_UNLABELLED, MAX_LENGTH = 20, 16, 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster (and far steadier on a busy machine) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup3(tmp_path_factory) -> dict:
    return make_setup(tmp_path_factory.mktemp("mq"), TASKS)


def tiny_args(setup: dict, out_dir: Path, *extra: str) -> list[str]:
    return [
        "--quick",
        "--base",
        setup["base"],
        "--experts",
        ",".join(f"{t}={p}" for t, p in setup["experts"].items()),
        "--data",
        ",".join(f"{t}={p}" for t, p in setup["data"].items()),
        "--num_test",
        str(NUM_TEST),
        "--num_unlabelled",
        str(NUM_UNLABELLED),
        "--max_length",
        str(MAX_LENGTH),
        "--steps",
        "3",
        "--eval_batch_size",
        "8",
        "--threads",
        "1",
        "--cache_dir",
        setup["cache"],
        "--out_dir",
        str(out_dir),
        *extra,
    ]


# ---------------------------------------------------------------------------------------- subsets


def test_choose_subsets_all_when_few() -> None:
    assert mq.choose_subsets(4, 2, 6, 0) == list(itertools.combinations(range(4), 2))
    assert mq.choose_subsets(4, 2, 100, 0) == list(itertools.combinations(range(4), 2))


def test_choose_subsets_k_equals_t_gives_one() -> None:
    assert mq.choose_subsets(6, 6, 3, 0) == [(0, 1, 2, 3, 4, 5)]


def test_choose_subsets_seeded_sample() -> None:
    first = mq.choose_subsets(6, 3, 4, seed=1)
    assert first == mq.choose_subsets(6, 3, 4, seed=1)  # deterministic
    assert len(first) == 4 == len(set(first))
    assert first == sorted(first)
    for subset in first:
        assert len(subset) == 3 and list(subset) == sorted(subset) and set(subset) <= set(range(6))
    others = {tuple(mq.choose_subsets(6, 3, 4, seed=s)) for s in range(2, 8)}
    assert len(others) > 1  # the seed matters
    big = mq.choose_subsets(40, 20, 3, seed=0)  # too many combinations to list: rejection sampling
    assert big == mq.choose_subsets(40, 20, 3, seed=0) and len(set(big)) == 3


# ---------------------------------------------------------------------------------------- tables


def test_anp_table_rows_mean_and_percentages() -> None:
    rows = [
        {"k": 2, "tasks": "a+b", "method": "m1", "anp": 0.9},
        {"k": 2, "tasks": "a+c", "method": "m1", "anp": 0.8},
        {"k": 3, "tasks": "a+b+c", "method": "m1", "anp": 0.7},
        {"k": 2, "tasks": "a+b", "method": "m2", "anp": 1.0},
        {"k": 2, "tasks": "a+c", "method": "m2", "anp": 1.0},
        {"k": 3, "tasks": "a+b+c", "method": "m2", "anp": 0.5},
    ]
    lines = mq.anp_table(rows, ["m2", "m1"]).splitlines()
    assert lines[0] == "| k | subsets | m2 | m1 |"
    assert lines[2] == "| 2 | 2 | 100.0 | 85.0 |"
    assert lines[3] == "| 3 | 1 | 50.0 | 70.0 |"
    assert lines[4] == "| mean |  | 75.0 | 77.5 |"  # mean of the k rows


# ---------------------------------------------------------------------------------------- end to end


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_quick_run_on_tiny_models(setup3: dict, tmp_path: Path, capsys) -> None:
    methods = ["task_arithmetic", "ties", "js-layer", "entropy-task"]
    out = tmp_path / "out"
    assert mq.main(tiny_args(setup3, out, "--methods", ",".join(methods))) == 0
    printed = capsys.readouterr().out
    assert "estimated time" in printed and "wall time per phase" in printed
    assert "k=2: 2, k=3: 1" in printed  # subsets per k, quick: 2 per k, 1 for k = T
    for name in ("merge_quality.csv", "merge_quality.md", "merge_quality.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0

    rows = read_csv(out / "merge_quality.csv")
    assert len(rows) == 3 * len(methods)
    assert {r["method"] for r in rows} == set(methods)
    assert all(math.isfinite(float(r["anp"])) for r in rows)
    assert all(0 <= float(r["ci_low"]) <= float(r["ci_high"]) for r in rows)  # every ANP has its interval
    assert {r["k"] for r in rows} == {"2", "3"}

    table = (out / "merge_quality.md").read_text()
    anp_part, space_part = table.split("\n| k |")[1].split("\n\n")[:2]
    lines = ["| k |" + anp_part.splitlines()[0], *anp_part.splitlines()[1:]]
    assert lines[0] == "| k | subsets | " + " | ".join(methods) + " |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["2", "3", "mean"]
    interval = r"\d+\.\d \[\d+\.\d, \d+\.\d\]"  # e.g. 95.2 [93.9, 96.4]; the mean over k has none
    assert all(re.fullmatch(interval, c.strip()) for line in lines[2:4] for c in line.split("|")[3:-1])
    # per learned method: trainable coefficients at the largest k and the step time
    assert space_part.startswith(
        "| method | coefficients (k = 3) | task vectors MB (k = 3) | step ms (mean) |"
    )
    assert [line.split("|")[1].strip() for line in space_part.splitlines()[2:]] == [
        "js-layer",
        "entropy-task",
    ]
    assert "| entropy-task | 3 |" in space_part  # one coefficient per task

    assert table.split("\n| k |")[1].split("\n\n")[0] in printed  # the table is printed too

    # Static task arithmetic evaluated directly with the library gives the same ANP.
    experts = load_experts(setup3["base"], setup3["experts"])
    specs = [
        TaskSpec(name=t, source=p, num_unlabelled=NUM_UNLABELLED, num_val=0, num_test=NUM_TEST)
        for t, p in setup3["data"].items()
    ]
    dm = MergeDataModule(specs, tokenizer=setup3["base"], max_length=MAX_LENGTH, eval_batch_size=8)
    for row in (r for r in rows if r["method"] == "task_arithmetic"):
        tasks = row["tasks"].split("+")
        sub = experts.subset(tasks)
        merged = MergedModel(sub, granularity="task")
        full = MergedModel(experts, granularity="task")
        ta = {
            f"{sub.prefix}.{n}": v
            for n, v in static_merge("task_arithmetic", sub.base, sub.task_vectors).items()
        }
        ratios = []
        with torch.no_grad():
            for t, task in enumerate(tasks):
                expert_params = full.merged_params(full.one_hot_table(experts.task_names.index(task)))
                hits = {"merged": 0, "expert": 0}
                for batch in dm.eval_loader(task, "test"):
                    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                    m = task_logits(merged, t, ta, **inputs).argmax(-1)
                    e = task_logits(full, experts.task_names.index(task), expert_params, **inputs).argmax(-1)
                    hits["merged"] += int((m == batch["labels"]).sum())
                    hits["expert"] += int((e == batch["labels"]).sum())
                assert float(row[f"acc_{task}"]) == pytest.approx(hits["merged"] / NUM_TEST, abs=1e-6)
                ratios.append(hits["merged"] / hits["expert"])
        assert float(row["anp"]) == pytest.approx(sum(ratios) / len(ratios), abs=1e-5)


def test_worker_processes_give_the_same_rows(setup3: dict, tmp_path: Path, capsys) -> None:
    methods = "ties,js-layer"
    assert mq.main(tiny_args(setup3, tmp_path / "one", "--methods", methods, "--max_k", "2")) == 0
    two = tiny_args(setup3, tmp_path / "two", "--methods", methods, "--max_k", "2", "--workers", "2")
    assert mq.main(two) == 0
    assert "on 2 worker processes" in capsys.readouterr().out

    def results(name: str) -> list[dict[str, str]]:
        rows = read_csv(tmp_path / name / "merge_quality.csv")
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]

    assert len(results("one")) == 4  # 2 subsets x 2 methods, in job order whatever finished first
    assert results("two") == results("one")


def test_ceiling_runs_end_to_end(setup3: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert mq.main(tiny_args(setup3, out, "--methods", "ties,ceiling-layer", "--max_k", "2")) == 0
    rows = read_csv(out / "merge_quality.csv")
    assert [r["method"] for r in rows] == ["ties", "ceiling-layer"] * 2
    assert (
        "ceiling-layer: the same training on the labelled test inputs"
        in (out / "merge_quality.md").read_text()
    )


def test_a_dead_worker_stops_the_run_with_an_error(setup3: dict, tmp_path: Path) -> None:
    settings = mq.resolve_settings(
        mq.build_parser().parse_args(tiny_args(setup3, tmp_path, "--workers", "2"))
    )
    broken = dataclasses.replace(settings, experts={t: str(tmp_path / "missing") for t in settings.tasks})
    jobs = [(0, 2, ("a", "b"), "ties"), (1, 2, ("a", "c"), "ties")]
    with pytest.raises(mq.DivMergeError, match="worker process died"):
        list(mq.run_jobs(broken, None, jobs))  # workers fail to load the experts at start-up


def test_dry_run_prints_the_plan_and_writes_nothing(setup3: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert mq.main(tiny_args(setup3, out, "--dry_run", "--methods", "ties,js-task")) == 0
    printed = capsys.readouterr().out
    assert "k=2: 2, k=3: 1; 6 merges of 2 methods" in printed and "estimated time" in printed
    assert not out.exists()


def two_tasks(setup3: dict) -> tuple:
    """Experts a and b, their unlabelled datasets, random teachers, and the data module."""
    experts = load_experts(setup3["base"], setup3["experts"]).subset(["a", "b"])
    specs = [
        TaskSpec(name=t, source=setup3["data"][t], num_unlabelled=NUM_UNLABELLED, num_val=0, num_test=4)
        for t in ("a", "b")
    ]
    dm = MergeDataModule(specs, tokenizer=setup3["base"], max_length=MAX_LENGTH)
    data = [dm.dataset(t, "unlabelled") for t in ("a", "b")]
    teachers = [torch.log_softmax(torch.randn(NUM_UNLABELLED, n), -1) for n in (2, 3)]
    return experts, data, teachers, dm


def test_learned_merge_is_reproducible(setup3: dict) -> None:
    experts, data, teachers, dm = two_tasks(setup3)

    def coefficients(seed: int) -> torch.Tensor:
        merged, _, _ = mq.learned_merge(experts, "js-layer", data, teachers, dm.collate, 4, seed=seed)
        return merged.coefficients().detach()

    first = coefficients(0)
    assert torch.equal(first, coefficients(0))
    assert not torch.allclose(first, torch.full_like(first, 0.5))  # it trained from 1/k
    start, _, _ = mq.learned_merge(experts, "js-layer", data, teachers, dm.collate, 0, init=0.3)
    assert torch.equal(start.coefficients().detach(), torch.full_like(first, 0.3))  # --init


def test_learned_merge_from_a_static_start(setup3: dict) -> None:
    experts, data, teachers, dm = two_tasks(setup3)
    assert mq.is_valid_method("js-row@tsv_m") and mq.is_valid_method("kl-svd4@ties")
    assert not any(map(mq.is_valid_method, ("js-row@tsv", "tsv_m@ties", "js-row@js-layer", "js-rows@ties")))
    _, params, _ = mq.learned_merge(experts, "js-layer@tsv_m", data, teachers, dm.collate, 0)
    tsv = static_merge("tsv_m", experts.base, experts.task_vectors)
    for name, tensor in tsv.items():
        torch.testing.assert_close(params[f"{experts.prefix}.{name}"], tensor)  # step 0 is TSV-M
    merged, moved, _ = mq.learned_merge(experts, "js-layer@tsv_m", data, teachers, dm.collate, 3, lr=0.1)
    assert (merged.coefficients.weight != 0).all() and any(
        not torch.equal(moved[k], params[k]) for k in params
    )


def test_held_out_selection_keeps_the_best_coefficients(setup3: dict) -> None:
    experts, data, teachers, dm = two_tasks(setup3)
    storage = {}
    for method in ("js-svd2", "js-row"):
        merged, _, report = mq.learned_merge(
            experts, method, data, teachers, dm.collate, 6, lr=0.2, holdout=0.25, eval_every=2
        )
        assert (
            report["best_step"] in (0, 2, 4, 6)
            and report["coefficients"] == merged.coefficients.weight.numel()
        )
        # the kept coefficients are the ones whose held-out divergence was reported
        merger = mq.Merger.from_expert_set(experts)
        merger.merged = merged  # the learned model, its space and kept coefficients
        merger.teachers = {
            (t, "unlabelled"): teacher for t, teacher in zip(("a", "b"), teachers, strict=True)
        }
        _, held = mq.split_holdout(data, 0.25, 0)
        assert len(held[0]) == round(0.25 * NUM_UNLABELLED)
        assert (
            abs(mq.mean_divergence(merger, held, dm.collate, "unlabelled") - report["heldout_divergence"])
            < 1e-6
        )
        storage[method] = report["task_vector_mb"]
    _, _, dense = mq.learned_merge(experts, "js-layer", data, teachers, dm.collate, 0)
    assert storage["js-svd2"] < dense["task_vector_mb"] == storage["js-row"]  # rank 2 stores less
    assert mq.parse_learned("js-svd8") == ("js", "svd", {"rank": 8}) and mq.is_valid_method("kl-svd3")


def test_ceiling_fits_the_test_labels(setup3: dict) -> None:
    experts = load_experts(setup3["base"], setup3["experts"]).subset(["a", "b"])
    specs = [
        TaskSpec(name=t, source=setup3["data"][t], num_unlabelled=4, num_val=0, num_test=NUM_TEST)
        for t in ("a", "b")
    ]
    dm = MergeDataModule(specs, tokenizer=setup3["base"], max_length=MAX_LENGTH)
    tests = [dm.dataset(t, "test") for t in ("a", "b")]
    batches = {t: dm.collate([ds[i] for i in range(len(ds))]) for t, ds in enumerate(tests)}

    @torch.no_grad()
    def test_loss(merged: MergedModel) -> float:
        params, total = merged.merged_params(), 0.0
        for t, b in batches.items():
            logits = task_logits(
                merged, t, params, input_ids=b["input_ids"], attention_mask=b["attention_mask"]
            )
            total += float(torch.nn.functional.cross_entropy(logits, b["labels"]))
        return total

    start, _, _ = mq.learned_merge(experts, "ceiling-layer", tests, [], dm.collate, 0)
    fitted, _, _ = mq.learned_merge(
        experts, "ceiling-layer", tests, [], dm.collate, 30, batch_per_task=8, lr=0.1
    )
    assert test_loss(fitted) < test_loss(start) - 1e-3  # it trains on the labels it is scored on
    assert "ceiling-layer" in mq.valid_methods() and not any("ceiling" in m for m in mq.DEFAULT_METHODS)


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max_k", "4"], "max_k=4 asks for more tasks than there are experts (3"),
        (["--methods", "js-layer,magic"], "Unknown method 'magic'"),
        (["--min_k", "1"], "k must be at least 2"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--init", "nan"], "--init must be a finite number"),
        (["--max_k", "1"], "k must be at least 2"),
        (["--tasks", "a,b,zzz"], "Tasks ['zzz'] have no expert"),
        (["--methods", "js-svd0"], "Unknown method 'js-svd0'"),
        (["--methods", "js-rows"], "Unknown method 'js-rows'"),
        (["--holdout", "1"], "--holdout must be a fraction in [0, 1)"),
        (["--eval_every", "0"], "--eval_every must be at least 1"),
    ],
)
def test_bad_input_exits_2(setup3: dict, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "out"
    assert mq.main(tiny_args(setup3, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("merge_quality: error: ") and message in err[0]
    assert not out.exists()  # nothing written


def test_unknown_demo_task_and_method_list() -> None:
    with pytest.raises(mq.DivMergeError, match="have no expert"):
        mq.resolve_settings(mq.build_parser().parse_args(["--tasks", "rt,nope"]))
    with pytest.raises(mq.DivMergeError, match="js-layer") as err:
        mq.resolve_settings(mq.build_parser().parse_args(["--methods", "fancy"]))
    assert "task_arithmetic" in str(err.value)  # the valid methods are listed


def test_script_entry_point(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["merge_quality", "--methods", "nope"])
    monkeypatch.delitem(sys.modules, "benchmarks.merge_quality")  # run it fresh, as python -m does
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("benchmarks.merge_quality", run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("merge_quality: error: Unknown method 'nope'")


def test_generative_run_on_tiny_causal_lms(tmp_path: Path, capsys) -> None:
    """--generative: causal-LM experts, prompts from a template, answers scored by exact match."""
    from tests import tiny_lm

    setup = tiny_lm.make_setup(tmp_path / "lm")
    pairs = ",".join(f"{t}={p}" for t, p in setup["experts"].items())
    data = ",".join(f"{t}={p}" for t, p in setup["data"].items())
    out = tmp_path / "out"
    args = ["--generative", "--base", setup["base"], "--experts", pairs, "--data", data, "--plain_prompts"]
    args += ["--prompt_template", tiny_lm.TEMPLATE, "--methods", "task_arithmetic,js-layer", "--quick"]
    args += ["--steps", "2", "--num_test", "8", "--num_unlabelled", "8", "--max_length", "16"]
    args += ["--cache_dir", str(tmp_path / "cache"), "--out_dir", str(out), "--threads", "1"]
    assert mq.main(args) == 0
    rows = read_csv(out / "merge_quality.csv")
    assert {r["method"] for r in rows} == {"task_arithmetic", "js-layer"} and len(rows) == 2
    for row in rows:  # exact-match scores of 8 answers each, and their ratio to the experts'
        assert all(
            float(row[f"acc_{t}"]) * 8 == pytest.approx(round(float(row[f"acc_{t}"]) * 8))
            for t in setup["experts"]
        )
        assert 0 <= float(row["anp"]) <= 2
        assert float(row["ci_low"]) <= float(row["ci_high"])  # exact match is scored per answer: an interval
    settings = mq.resolve_settings(mq.build_parser().parse_args(["--generative"]))
    assert settings.base == "zoo:smollm2" and settings.max_length == mq.GEN_MAX_LENGTH
    assert settings.tasks == list(mq.GEN_TASKS) and settings.experts["rt"] == "zoo:smollm2/rt"
    assert settings.chat_template and settings.prompt_template == "{prompt}"
