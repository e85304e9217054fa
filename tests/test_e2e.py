"""End to end on the real offline demo: packaged MiniLM base, real task data, small experts."""

import json
import math

import pytest
import torch
import yaml

import train
from divmerge.zoo import ExpertRecipe, build_expert

TASKS = ("rt", "sms_spam", "trec", "bbc")


@pytest.mark.e2e
def test_demo_merge_end_to_end_small(tmp_path, capsys):
    recipe = ExpertRecipe(num_train=96, epochs=1, max_length=32, batch_size=32)
    experts = {t: str(build_expert(t, recipe, cache_dir=tmp_path / "zoo", progress=False)) for t in TASKS}
    run = tmp_path / "run"
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run)},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "ckpt"), "save_last": True},
                }
            ],
        },
        "model": {"base": "zoo:minilm", "experts": experts, "cache_dir": str(tmp_path / "cache"), "lr": 0.05},
        "data": {
            "tasks": [
                {"name": t, "source": f"zoo:{t}", "num_unlabelled": 16, "num_val": 16, "num_test": 48}
                for t in TASKS
            ],
            "max_length": 32,
            "eval_batch_size": 48,
        },
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cli = train.main(["fit", "--config", str(tmp_path / "cfg.yaml")])
    out = capsys.readouterr().out
    for task in TASKS:
        assert f"| {task}" in out
    report = json.loads(next(run.rglob("report_test.json")).read_text())
    assert [r["task"] for r in report["tasks"]] == list(TASKS)
    assert all(r["examples"] == 48 for r in report["tasks"])
    assert math.isfinite(report["anp"]) and report["anp"] > 0.3
    assert math.isfinite(report["reference_anp"])
    weights = cli.model.merged.coefficients.weight.detach()
    assert weights.shape[0] == 4 and not torch.allclose(weights, torch.full_like(weights, 0.25))
