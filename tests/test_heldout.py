"""The held-out, label-free selection signal: the training divergence on the val inputs, val/divergence."""

from pathlib import Path

import pandas as pd
import torch
import yaml

import train
from tests.test_cli import write_config


def test_val_divergence_is_logged_and_selects_a_checkpoint(tmp_path, tiny):
    path = Path(write_config(tmp_path, tiny, epochs=3))
    config = yaml.safe_load(path.read_text())
    config["model"]["granularity"] = "row"
    config["model"]["lr"] = 0.5  # large steps: the held-out divergence moves from epoch to epoch
    config["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(tmp_path / "best"),
                "monitor": "val/divergence",
                "mode": "min",
                "filename": "best-{epoch}",
            },
        }
    ]
    path.write_text(yaml.safe_dump(config))
    cli = train.main(["fit", "--config", str(path)])
    metrics = pd.read_csv(next((tmp_path / "run").rglob("metrics.csv")))
    held = metrics[["epoch", "val/divergence", "val/js/alpha", "val/js/beta"]].dropna()
    assert len(held) == 3  # once per epoch
    summed = held["val/js/alpha"] + held["val/js/beta"]
    assert (held["val/divergence"] - summed).abs().max() < 1e-6  # summed over tasks, like train/loss
    # the last value is the final coefficients' divergence on every val input, recomputed here
    engine, dm = cli.model.engine, cli.datamodule
    again = 0.0
    for task in ("alpha", "beta"):
        ds = dm.dataset(task, "val")
        batch = dm.collate([ds[i] for i in range(len(ds))])
        again += float(engine.divergence({task: batch}, "val")[task])
    assert abs(again - held["val/divergence"].iloc[-1]) < 1e-5
    best_epoch = int(held["epoch"].iloc[int(held["val/divergence"].to_numpy().argmin())])
    assert [p.name for p in (tmp_path / "best").iterdir()] == [f"best-epoch={best_epoch}.ckpt"]
    assert next((tmp_path / "run").rglob("divergence.png")).stat().st_size > 0
    assert torch.isfinite(cli.model.merged.coefficients.weight).all()
