"""DDP through Lightning on CPU (gloo): 2 processes learn what one process learns on the same global batch."""

import subprocess
import sys
from pathlib import Path

import torch

from tests.test_cli import coefficients, write_config

ROOT = Path(__file__).resolve().parents[1]


def run_fit(config: str, cwd: Path, ckpt_dir: Path, *flags: str) -> str:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "fit",
        "--config",
        config,
        "--trainer.callbacks.init_args.dirpath",
        str(ckpt_dir),
        *flags,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, tiny):
    config = write_config(tmp_path, tiny, epochs=2)
    log = run_fit(
        config,
        tmp_path,
        tmp_path / "ddp",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--data.batch_size_per_task",
        "2",
    )
    cache = list((tmp_path / "cache" / "teachers").iterdir())
    assert log.count("teacher cache: built") == len(cache) == 6  # built once, by rank 0 only
    run_fit(
        config, tmp_path, tmp_path / "single", "--trainer.devices", "1", "--data.batch_size_per_task", "4"
    )
    ddp, single = (
        coefficients(tmp_path / "ddp" / "last.ckpt"),
        coefficients(tmp_path / "single" / "last.ckpt"),
    )
    assert not torch.allclose(single, torch.full_like(single, 0.5))  # it learned something
    assert (ddp - single).abs().max() < 1e-5
