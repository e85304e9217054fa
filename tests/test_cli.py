import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import train
from divmerge.engine import Merger
from divmerge.families.classification import task_logits
from tests.tiny import SimulatedKillError, cpu_trainer, make_expert

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, tiny: dict, experts: dict | None = None, epochs: int = 2, **data_kw) -> str:
    run = tmp_path / "run"
    cfg = {
        "seed_everything": 0,
        "trainer": cpu_trainer(run, epochs, checkpoints=True),
        "model": {
            "base": tiny["base"],
            "experts": experts or tiny["experts"],
            "cache_dir": str(tmp_path / "cache"),
            "lr": 0.05,
        },
        "data": {
            "tasks": [
                {"name": n, "source": p, "num_unlabelled": 12, "num_val": 8, "num_test": 8, **data_kw}
                for n, p in tiny["data"].items()
            ],
            "batch_size_per_task": 4,
            "eval_batch_size": 8,
            "max_length": 16,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def coefficients(ckpt: Path) -> torch.Tensor:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"][
        "merged.coefficients.weight"
    ]


def expect_error(capsys, args: list[str], match: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "divmerge: error:" in err and match in err, err
    return err


def test_fit_learns_reports_and_checkpoints_small(tmp_path, tiny, capsys):
    cli = train.main(["fit", "--config", write_config(tmp_path, tiny, epochs=4)])
    out = capsys.readouterr()
    assert "| ANP" in out.out + out.err and "task arithmetic" in out.out + out.err
    phases = cli.timer.seconds
    assert list(phases)[:3] == ["start-up", "setup", "teacher cache"], phases
    assert {"train", "validation", "test"} <= set(phases) and all(v >= 0 for v in phases.values())
    assert "Wall time per phase" in out.out and "| teacher cache |" in out.out
    metrics = pd.read_csv(next((tmp_path / "run").rglob("metrics.csv")))
    loss = metrics["train/loss"].dropna().to_numpy()
    assert loss[-3:].mean() < loss[:3].mean()  # the divergence goes down
    report = next((tmp_path / "run").rglob("report_test.json"))
    assert report.with_suffix(".md").is_file()
    for figure in ("coefficients.png", "divergence.png", "coefficients.json"):
        assert (report.parent / figure).stat().st_size > 1000, figure
    ckpt = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert ckpt.stat().st_size < 64_000
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert list(state["state_dict"]) == ["merged.coefficients.weight"]
    assert state["divmerge"]["fingerprint"] == cli.model.fingerprint
    assert [n for n, p in cli.model.named_parameters() if p.requires_grad] == ["merged.coefficients.weight"]


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_resume_reaches_the_same_coefficients(tmp_path, tiny, schedule):
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    train.main(["fit", "--config", write_config(straight, tiny, epochs=4), "--model.lr_schedule", schedule])
    config = write_config(split, tiny, epochs=4)
    stop = '{"class_path": "tests.tiny.StopAfterEpochs", "init_args": {"epochs": 2}}'
    train.main(["fit", "--config", config, "--model.lr_schedule", schedule, "--trainer.callbacks+", stop])
    halfway = coefficients(split / "run" / "ckpt" / "last.ckpt")
    assert torch.load(split / "run" / "ckpt" / "last.ckpt", weights_only=False)["epoch"] == 1
    train.main(["fit", "--config", config, "--model.lr_schedule", schedule, "--ckpt_path", "last"])
    want = coefficients(straight / "run" / "ckpt" / "last.ckpt")
    got = coefficients(split / "run" / "ckpt" / "last.ckpt")
    assert not torch.equal(halfway, want)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    state = torch.load(split / "run" / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (
        state["global_step"]
        == torch.load(straight / "run" / "ckpt" / "last.ckpt", weights_only=False)["global_step"]
    )


def test_teacher_cache_is_reused_and_never_recomputed_in_training(tmp_path, tiny, monkeypatch):
    config = write_config(tmp_path, tiny, epochs=1)
    train.main(["fit", "--config", config])
    cached = sorted(p.name for p in (tmp_path / "cache" / "teachers").iterdir())
    assert len(cached) == 6  # 2 tasks x (unlabelled, val, test)

    def boom(*args, **kwargs):
        raise AssertionError("an expert forward ran although the cache was warm")

    monkeypatch.setattr(Merger, "compute_teacher", boom)
    train.main(["fit", "--config", config])
    assert sorted(p.name for p in (tmp_path / "cache" / "teachers").iterdir()) == cached
    monkeypatch.undo()
    # other data -> a new cache entry instead of stale outputs
    train.main(["fit", "--config", write_config(tmp_path, tiny, epochs=1, num_unlabelled=16)])
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 8


def test_resume_against_other_experts_fails_clearly(tmp_path, tiny, capsys):
    config = write_config(tmp_path, tiny, epochs=1)
    train.main(["fit", "--config", config])
    ckpt = str(tmp_path / "run" / "ckpt" / "last.ckpt")
    other = dict(tiny["experts"], beta=str(make_expert(tiny["base"], tmp_path / "beta2", 3, seed=42)))
    other_cfg = tmp_path / "o"
    other_cfg.mkdir()
    expect_error(
        capsys,
        ["fit", "--config", write_config(other_cfg, tiny, experts=other), "--ckpt_path", ckpt],
        "another expert set",
    )
    assert not (other_cfg / "run").exists()  # refused before anything was written


def test_corrupt_and_missing_checkpoints(tmp_path, tiny, capsys):
    config = write_config(tmp_path, tiny, epochs=1)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80\x04 not a checkpoint")
    expect_error(capsys, ["fit", "--config", config, "--ckpt_path", str(bad)], "corrupt")
    expect_error(
        capsys, ["validate", "--config", config, "--ckpt_path", str(tmp_path / "none.ckpt")], "does not exist"
    )
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    expect_error(capsys, ["test", "--config", config, "--ckpt_path", str(foreign)], "not written by divmerge")


def test_tasks_must_match_experts(tmp_path, tiny, capsys):
    experts = {"alpha": tiny["experts"]["alpha"], "gamma": tiny["experts"]["beta"]}
    expect_error(capsys, ["fit", "--config", write_config(tmp_path, tiny, experts=experts)], "differ")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_class_count_must_match_the_expert(tmp_path, tiny, capsys):
    experts = {
        "alpha": tiny["experts"]["beta"],
        "beta": tiny["experts"]["alpha"],
    }  # 3-class head on 2-class data
    expect_error(
        capsys, ["validate", "--config", write_config(tmp_path, tiny, experts=experts)], "labels span"
    )


def test_unknown_objective_and_granularity(tmp_path, tiny, capsys):
    config = write_config(tmp_path, tiny)
    expect_error(capsys, ["fit", "--config", config, "--model.objective", "hellinger"], "Unknown objective")


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["experts"] and len(printed["data"]["tasks"]) == len(printed["model"]["experts"])
    assert {t["name"] for t in printed["data"]["tasks"]} == set(printed["model"]["experts"])


def test_default_config_is_the_demo():
    assert train.with_default_config(["fit"]) == ["fit", "--config", str(train.DEMO_CONFIG)]
    assert train.with_default_config(["fit", "--config", "x.yaml"]) == ["fit", "--config", "x.yaml"]
    assert train.with_default_config(["--help"]) == ["--help"]


def test_help_documents_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model.granularity" in out and "one coefficient per task" in out and "--trainer.precision" in out


def test_bad_input_exits_with_one_line_and_no_traceback(tmp_path, tiny):
    experts = {"alpha": str(tmp_path / "missing"), "beta": tiny["experts"]["beta"]}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "fit",
            "--config",
            write_config(tmp_path, tiny, experts=experts),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "divmerge: error: Model directory" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_static_method_is_evaluated_without_training(tmp_path, tiny, capsys):
    config = write_config(tmp_path, tiny)
    train.main(
        ["test", "--config", config, "--model.method", "ties", "--model.method_options", "{density: 0.5}"]
    )
    out = capsys.readouterr().out
    assert "static ties merge" in out and "| ANP" in out
    assert not (tmp_path / "run" / "ckpt").exists()  # nothing was trained
    expect_error(capsys, ["fit", "--config", config, "--model.method", "ties"], "nothing to train")


def test_unknown_method_and_options(tmp_path, tiny, capsys):
    config = write_config(tmp_path, tiny)
    err = expect_error(
        capsys, ["test", "--config", config, "--model.method", "slerp"], "Unknown merge method"
    )
    assert "ties" in err and "dare" in err
    expect_error(
        capsys,
        ["test", "--config", config, "--model.method", "ties", "--model.method_options", "{p: 0.3}"],
        "no option",
    )
    expect_error(
        capsys,
        ["test", "--config", config, "--model.method", "ties", "--model.method_options", "{density: 1.5}"],
        "density",
    )


def test_export_learned_merge_matches_the_merged_model(tmp_path, tiny, capsys):
    from transformers import AutoModel

    from divmerge.export import load_task_model

    config = write_config(tmp_path, tiny, epochs=1)
    cli = train.main(["fit", "--config", config])
    ckpt = str(tmp_path / "run" / "ckpt" / "last.ckpt")
    out = tmp_path / "export"
    train.main(["export", "--config", config, "--ckpt_path", ckpt, "--out_dir", str(out)])
    assert AutoModel.from_pretrained(out) is not None
    card = (out / "README.md").read_text()
    assert "alpha" in card and "beta" in card and "js" in card
    merged = cli.model.build()
    params = cli.model.eval_params()
    ids = torch.randint(1000, 2000, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for t, task in enumerate(merged.task_names):
        want = task_logits(merged, t, params, input_ids=ids, attention_mask=mask)
        got = load_task_model(out, task)(input_ids=ids, attention_mask=mask).logits
        assert (got - want).abs().max() < 1e-5
    # an existing export is not overwritten without --overwrite, and stays intact
    before = sorted(p.name for p in out.iterdir())
    expect_error(
        capsys, ["export", "--config", config, "--ckpt_path", ckpt, "--out_dir", str(out)], "--overwrite"
    )
    assert sorted(p.name for p in out.iterdir()) == before
    train.main(["export", "--config", config, "--ckpt_path", ckpt, "--out_dir", str(out), "--overwrite"])


def test_export_static_merge_and_missing_inputs(tmp_path, tiny, capsys):
    config = write_config(tmp_path, tiny)
    out = tmp_path / "ties"
    train.main(["export", "--config", config, "--model.method", "ties", "--out_dir", str(out)])
    assert (out / "model.safetensors").is_file() and (out / "heads" / "beta").is_dir()
    expect_error(capsys, ["export", "--config", config, "--out_dir", str(tmp_path / "x")], "--ckpt_path")
    missing = {"alpha": str(tmp_path / "gone"), "beta": tiny["experts"]["beta"]}
    expect_error(
        capsys,
        [
            "export",
            "--config",
            write_config(tmp_path, tiny, experts=missing),
            "--model.method",
            "ties",
            "--out_dir",
            str(tmp_path / "y"),
        ],
        "does not exist",
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bf16_mixed_precision_trains_fp32_coefficients(tmp_path, tiny):
    cli = train.main(
        ["fit", "--config", write_config(tmp_path, tiny, epochs=2), "--trainer.precision", "bf16-mixed"]
    )
    weights = coefficients(tmp_path / "run" / "ckpt" / "last.ckpt")
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()
    assert not torch.allclose(weights, torch.full_like(weights, 0.5))
    metrics = pd.read_csv(next((tmp_path / "run").rglob("metrics.csv")))
    assert metrics["train/loss"].dropna().map(lambda v: v == v and abs(v) < 10).all()
    assert cli.trainer.precision == "bf16-mixed"


def test_held_out_task_is_reported_apart(tmp_path, tiny, capsys):
    config = write_config(tmp_path, tiny, experts={"alpha": tiny["experts"]["alpha"]})
    train.main(["fit", "--config", config, "--model.held_out", f"{{beta: {tiny['experts']['beta']}}}"])
    out = capsys.readouterr().out
    assert "beta (held-out)" in out and "held-out vs base" in out
    report = json.loads(next((tmp_path / "run").rglob("report_test.json")).read_text())
    assert report["tasks"][1]["held_out"] and report["held_out_anp"] == report["held_out_anp"]  # finite
    assert report["anp"] == report["tasks"][0]["normalised"]  # ANP covers the held-in task only


def test_help_lists_every_registered_name(capsys):
    """--help names every objective, static merge method and coefficient space (the registries' keys)."""
    from divmerge.core.coefficients import SPACES
    from divmerge.objectives import OBJECTIVES
    from divmerge.static import STATIC_METHODS

    with pytest.raises(SystemExit):
        train.main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # unwrap
    for name in [*OBJECTIVES, *STATIC_METHODS, *SPACES]:
        assert f"``{name}``" in out or f"{{{name}," in out or f",{name}}}" in out or f",{name}," in out, name


@pytest.mark.parametrize("kill_after", [5, 6, 7])  # checkpoints at steps 4, 5 (mid-epoch) and 6 (epoch end)
def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path, tiny, kill_after):
    """Kill at any step, resume with --ckpt_path last: the uninterrupted run's coefficients and Adam state."""

    def config(root: Path) -> str:
        root.mkdir()
        path = Path(write_config(root, tiny, epochs=4))
        cfg = yaml.safe_load(path.read_text())
        cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
        cfg["data"]["tasks"][1]["num_unlabelled"] = 8  # 2 batches against 3: the shorter task cycles
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    straight, split = config(tmp_path / "straight"), config(tmp_path / "split")
    train.main(["fit", "--config", straight])
    crash = f'{{"class_path": "tests.tiny.CrashAtStep", "init_args": {{"step": {kill_after}}}}}'
    with pytest.raises(SimulatedKillError):
        train.main(["fit", "--config", split, "--trainer.callbacks+", crash])
    last = tmp_path / "split" / "run" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == kill_after - 1
    train.main(["fit", "--config", split, "--ckpt_path", "last"])
    want = torch.load(tmp_path / "straight" / "run" / "ckpt" / "last.ckpt", weights_only=True)
    got = torch.load(last, weights_only=True)
    assert got["global_step"] == want["global_step"] == 12
    key = "merged.coefficients.weight"
    assert (got["state_dict"][key] - want["state_dict"][key]).abs().max() < 1e-6
    for name in ("exp_avg", "exp_avg_sq"):
        ours, theirs = (s["optimizer_states"][0]["state"][0][name] for s in (got, want))
        assert (ours - theirs).abs().max() < 1e-6, name
