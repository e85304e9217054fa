"""Preemption: SIGTERM / SIGUSR1 mid-epoch save last.ckpt at the step, exit 128+N, and resume bit-exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

import train
from divmerge.lightning import preemption
from tests.test_cli import write_config

ROOT = Path(__file__).resolve().parents[1]
KEY = "merged.coefficients.weight"
STOP_AT = 5  # mid-epoch: 3 steps per epoch, so step 5 is the 2nd step of epoch 2


class WaitForSignal(Callback):
    """At step ``step``: write ``ready`` and wait until the Preemption callback has recorded a signal.

    The test process sends the signal when ``ready`` appears: a real signal from outside, at a known step.
    """

    def __init__(self, step: int, ready: str) -> None:
        self.step, self.ready = step, Path(ready)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        watcher = next(cb for cb in trainer.callbacks if isinstance(cb, preemption.Preemption))
        self.ready.write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while watcher.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)


class SignalSelf(Callback):
    """Sends ``signum`` to this process after step ``step`` (handled before the step's checkpoint)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def config(root: Path, tiny: dict) -> str:
    """The resume-exactness test's setup: 4 epochs of 3 steps, a shorter task that cycles."""
    root.mkdir()
    path = Path(write_config(root, tiny, epochs=4))
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["tasks"][1]["num_unlabelled"] = 8  # 2 batches against 3: the shorter task cycles
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """Every run of this file on one thread, in this process and its children: bit-exact comparisons
    across processes need the same reduction order (other tests may leave this process at another count).
    """
    saved, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(saved)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny, one_thread) -> tuple[str, Path]:
    """The uninterrupted run: its config and final checkpoint."""
    root = tmp_path_factory.mktemp("straight")
    cfg = config(root / "r", tiny)
    train.main(["fit", "--config", cfg])
    return cfg, root / "r" / "run" / "ckpt" / "last.ckpt"


@pytest.fixture(scope="module")
def straight(uninterrupted) -> dict:
    return torch.load(uninterrupted[1], weights_only=True)


def assert_same_run(got: dict, want: dict) -> None:
    assert got["global_step"] == want["global_step"] == 12
    assert torch.equal(got["state_dict"][KEY], want["state_dict"][KEY])  # bit-exact
    for name in ("exp_avg", "exp_avg_sq"):
        ours, theirs = (s["optimizer_states"][0]["state"][0][name] for s in (got, want))
        assert torch.equal(ours, theirs), name


def callback(name: str, **init_args) -> str:
    return json.dumps({"class_path": f"tests.test_preemption.{name}", "init_args": init_args})


def test_sigterm_mid_epoch_saves_the_step_exits_143_and_resumes_exactly(tmp_path, tiny, straight, one_thread):
    """A real SIGTERM from outside to a CPU run (SIGUSR1 without SLURM takes the same path: see below)."""
    signum = signal.SIGTERM
    cfg = config(tmp_path / "split", tiny)
    ready = tmp_path / "ready"
    wait = callback("WaitForSignal", step=STOP_AT, ready=str(ready))
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", cfg, "--trainer.callbacks+", wait]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.communicate()[1][-3000:]
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]  # 143 / 138: a scheduler sees a failure
    last = tmp_path / "split" / "run" / "ckpt" / "last.ckpt"
    lines = [line for line in err.splitlines() if "resume with" in line]
    assert len(lines) == 1 and f"--ckpt_path {last}" in lines[0], err[-3000:]
    assert f"stopped by {signum.name} after step {STOP_AT}" in lines[0]
    assert "Per-task accuracy on test" not in out  # stopped: no test pass
    assert not list(last.parent.glob(".*.tmp"))
    assert torch.load(last, weights_only=True)["global_step"] == STOP_AT
    train.main(["fit", "--config", cfg, "--ckpt_path", "last"])
    assert_same_run(torch.load(last, weights_only=True), straight)


def test_slurm_auto_requeue_checkpoints_at_the_step_then_requeues(
    tmp_path, tiny, straight, monkeypatch, capsys
):
    """Under SLURM (faked environment) SIGUSR1 saves last.ckpt at the step, then ``scontrol requeue``s."""
    for name, value in {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "merge",
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(preemption.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    cfg = config(tmp_path / "split", tiny)
    send = callback("SignalSelf", step=4, signum=int(signal.SIGUSR1))
    with pytest.raises(SystemExit) as stopped:
        train.main(["fit", "--config", cfg, "--trainer.callbacks+", send])
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert calls == [["scontrol", "requeue", "4242"]]
    err = capsys.readouterr().err
    assert "SLURM job 4242 requeued: it resumes with --ckpt_path last" in err, err
    last = tmp_path / "split" / "run" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert not list((tmp_path / "split").rglob("hpc_ckpt_*.ckpt"))  # no checkpoint from inside the handler
    train.main(["fit", "--config", cfg, "--ckpt_path", "last"])  # the requeued job's command
    assert_same_run(torch.load(last, weights_only=True), straight)
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # handlers handed back


def test_sigusr1_without_slurm_saves_and_exits_138(tmp_path, tiny, capsys):
    cfg = config(tmp_path / "split", tiny)
    send = callback("SignalSelf", step=2, signum=int(signal.SIGUSR1))
    with pytest.raises(SystemExit) as stopped:
        train.main(["fit", "--config", cfg, "--trainer.callbacks+", send, "--trainer.max_epochs", "1"])
    assert stopped.value.code == 128 + signal.SIGUSR1
    last = tmp_path / "split" / "run" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    err = capsys.readouterr().err
    assert f"resume with: python train.py fit --config {cfg}" in err and f"--ckpt_path {last}" in err, err


def test_sigterm_outside_training_steps_exits_143(uninterrupted, capsys, monkeypatch):
    """Lightning's own SIGTERM path (here: during test) no longer exits 0."""
    cfg, last = uninterrupted

    class SigtermInTest(Callback):
        def on_test_batch_end(self, trainer, *args) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

    original = train.DivMergeCLI.instantiate_trainer

    def instantiate(self, **kwargs):
        trainer = original(self, **kwargs)
        trainer.callbacks.append(SigtermInTest())
        return trainer

    monkeypatch.setattr(train.DivMergeCLI, "instantiate_trainer", instantiate)
    with pytest.raises(SystemExit) as stopped:
        train.main(["test", "--config", cfg, "--ckpt_path", str(last)])
    assert stopped.value.code == 143
    assert "stopped by SIGTERM before it finished" in capsys.readouterr().err


class SignalOneRank(SignalSelf):
    """Sends the signal to rank ``rank``'s process only (the others never receive it)."""

    def __init__(self, step: int, signum: int, rank: int) -> None:
        super().__init__(step, signum)
        self.rank = rank

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank:
            super().on_train_batch_end(trainer, *args)


def test_a_signal_to_one_ddp_rank_stops_every_rank_at_the_same_step(tmp_path, tiny):
    """2 gloo processes; only rank 1 is signalled: both stop after the same step, rank 0 writes last.ckpt."""
    cfg = write_config(tmp_path, tiny, epochs=2)
    send = callback("SignalOneRank", step=4, signum=int(signal.SIGTERM), rank=1)
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.batch_size_per_task", "2"]
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", cfg, *ddp, "--trainer.callbacks+", send]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.count("resume with:") == 1 and "after step 4" in proc.stderr, proc.stderr[-3000:]
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
