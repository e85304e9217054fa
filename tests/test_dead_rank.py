"""A process of a 2-process (gloo) run dies or hangs: the others stop in bounded time with one line.

Each run is killed from inside (``tests.tiny.KillAt``: ``kill -9`` of itself at a chosen hook), so the
phase is exact. Lightning starts rank 1 from rank 0 (``python train.py`` with ``devices: 2``).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from divmerge.lightning.checkpoint_io import SafeCheckpointIO
from divmerge.lightning.lost_process import LOST_PROCESS_EXIT
from tests.test_cli import write_config

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 420  # a hang would run into this; the runs below take 15-60 s on idle cores


def run_killed(tmp_path: Path, tiny: dict, rank: int, hook: str, *flags: str) -> tuple[int, str, float]:
    config = write_config(tmp_path, tiny, epochs=3)
    kill = {"class_path": "tests.tiny.KillAt", "init_args": {"rank": rank, "hook": hook, "epoch": 1}}
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", config]
    cmd += ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.batch_size_per_task", "2"]
    cmd += ["--trainer.callbacks+", json.dumps(kill), *flags]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=BOUND_S)  # raises on a hang
    return proc.returncode, out, time.perf_counter() - started


def one_line(out: str) -> str:
    assert "Traceback" not in out and "[rank0]:" not in out and "[rank1]:" not in out, out[-3000:]
    (line,) = [line for line in out.splitlines() if line.startswith("divmerge: error:")]
    return line


def test_rank_zero_dies_in_setup_and_rank_one_stops_with_one_line(tmp_path, tiny):
    code, out, _ = run_killed(tmp_path, tiny, 0, "setup")
    line = one_line(out)  # rank 1's: rank 0 is gone
    assert "Process 1 of 2 lost another process of this run during setup" in line, line
    assert "No checkpoint was written yet" in line and code != 0, (code, line)


@pytest.mark.parametrize(
    ("hook", "phase"), [("train_step", "training (step 3)"), ("validation", "validation")]
)
def test_rank_one_dies_and_rank_zero_stops_with_one_line(tmp_path, tiny, hook, phase):
    code, out, _ = run_killed(tmp_path, tiny, 1, hook)
    if code == -9 or code == 137:  # Lightning's watcher killed the run before a collective failed
        assert "Child process with PID" in out and "terminated with code -9" in out, out[-3000:]
    else:
        line = one_line(out)
        assert f"Process 0 of 2 lost another process of this run during {phase}" in line, line
        assert code == LOST_PROCESS_EXIT, code
        assert "Connection" in line and "--ckpt_path last" in line, line
    last = SafeCheckpointIO().load_checkpoint(tmp_path / "run" / "ckpt" / "last.ckpt")  # epoch 0's, whole
    assert last["epoch"] == 0 and torch.isfinite(last["state_dict"]["merged.coefficients.weight"]).all()


def test_rank_one_dies_while_a_checkpoint_is_saved_and_the_last_complete_one_loads(tmp_path, tiny):
    code, _, _ = run_killed(tmp_path, tiny, 1, "save")
    assert code != 0
    ckpt = tmp_path / "run" / "ckpt"
    assert not list(ckpt.glob(".*.tmp")), list(ckpt.iterdir())  # no half-written file
    last = SafeCheckpointIO().load_checkpoint(ckpt / "last.ckpt")
    assert last["epoch"] in (0, 1) and torch.isfinite(last["state_dict"]["merged.coefficients.weight"]).all()


def test_a_stuck_process_stops_the_run_at_the_collective_timeout(tmp_path, tiny):
    timeout = ["--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy"]
    timeout += ["--trainer.strategy.timeout", "0:00:20", "--trainer.strategy.process_group_backend", "gloo"]
    code, out, _ = run_killed(tmp_path, tiny, 1, "stop", *timeout)
    line = one_line(out)
    assert code == LOST_PROCESS_EXIT and "Process 0 of 2 lost another process" in line, line
    assert "Timed out" in line or "timed out" in line, line
