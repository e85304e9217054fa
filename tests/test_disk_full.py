"""A full disk (ENOSPC) or quota (EDQUOT) at each write site: one line, exit 2, nothing partial left.

Injected by ``FullDisk`` (writes under a folder fail after 16 bytes), and for real on a small tmpfs where
mounting one is permitted.
"""

import builtins
import errno
import io
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from lightning.fabric.plugins.io import torch_io
from lightning.pytorch import Callback

import train
from divmerge.disk import NoSpaceError, find_no_space, no_space_is_one_line
from divmerge.evaluation import TaskResult, write_report
from divmerge.experts.build_once import build_once
from divmerge.lightning.checkpoint_io import SafeCheckpointIO
from divmerge.plots import plot_coefficients
from divmerge.teachers import load_cached, save_atomic
from tests.test_cli import write_config


class FullDisk:
    """Writes under ``under`` (only to names ending in ``suffix``) fail with ENOSPC once ``on``."""

    def __init__(self, monkeypatch, under: Path, suffix: str = "", on: bool = True) -> None:
        self.under, self.suffix, self.on = under.resolve(), suffix, on
        real = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            fh = real(file, mode, *args, **kwargs)
            if not isinstance(file, int) and any(m in mode for m in "wax") and self.hits(Path(file)):
                return _Failing(fh)
            return fh

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

    def hits(self, path: Path) -> bool:
        path = path.resolve()
        return self.on and path.is_relative_to(self.under) and path.name.endswith(self.suffix)


class _Failing:
    """A file whose first 16 bytes are written (a partial file), then ENOSPC."""

    def __init__(self, fh) -> None:
        self.fh, self.count = fh, 0

    def write(self, data) -> int:
        room = 16 - self.count
        if len(data) > room:
            self.fh.write(bytes(data[:room]) if not isinstance(data, str) else data[:room])
            self.count = 16
            raise OSError(errno.ENOSPC, "No space left on device")
        self.count += len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def expect_no_space(capsys, args: list[str], path_part: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "No space left on device" in line]
    assert len(lines) == 1 and path_part in lines[0] and "free there" in lines[0], captured.err[-3000:]
    assert "Traceback" not in captured.err
    return captured.out


class FillAtStep(Callback):
    def __init__(self, disk: FullDisk, step: int) -> None:
        self.disk, self.step = disk, step

    def on_train_batch_end(self, trainer, *args) -> None:
        self.disk.on = trainer.global_step >= self.step


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(tmp_path, tiny, capsys, monkeypatch):
    config = Path(write_config(tmp_path, tiny, epochs=2))
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
    config.write_text(yaml.safe_dump(cfg))
    ckpt = tmp_path / "run" / "ckpt"
    disk = FullDisk(monkeypatch, ckpt, on=False)
    real_save = torch_io._atomic_save

    def atomic_save(checkpoint, filepath) -> None:  # Lightning writes via a system temp file, then moves
        if not disk.hits(Path(filepath)):
            return real_save(checkpoint, filepath)
        Path(filepath).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(filepath))

    monkeypatch.setattr(torch_io, "_atomic_save", atomic_save)
    original = train.DivMergeCLI.instantiate_trainer

    def instantiate(self, **kwargs):
        trainer = original(self, **kwargs)
        trainer.callbacks.insert(0, FillAtStep(disk, 3))
        return trainer

    monkeypatch.setattr(train.DivMergeCLI, "instantiate_trainer", instantiate)
    expect_no_space(capsys, ["fit", "--config", str(config)], str(ckpt))
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == 2  # intact, step 2's
    assert not [p for p in ckpt.iterdir() if "tmp" in p.name]


def test_the_table_is_out_before_the_figures_and_a_full_disk_there_keeps_it(
    tmp_path, tiny, capsys, monkeypatch
):
    config = write_config(tmp_path, tiny, epochs=1)
    FullDisk(monkeypatch, tmp_path / "run", suffix=".png")
    out = expect_no_space(capsys, ["fit", "--config", config], "coefficients.png' (it needs ")
    assert "Per-task accuracy on test" in out and "| ANP" in out  # printed before the figures
    logs = next((tmp_path / "run").rglob("report_test.json")).parent
    assert not list(logs.glob("*.png")) and not list(logs.glob(".*tmp*"))


def test_a_full_disk_during_export_leaves_no_directory(tmp_path, tiny, capsys, monkeypatch):
    config = write_config(tmp_path, tiny)
    out = tmp_path / "exports" / "ties"
    FullDisk(monkeypatch, tmp_path / "exports")
    args = ["export", "--config", config, "--model.method", "ties", "--out_dir", str(out)]
    expect_no_space(capsys, args, str(out))
    assert not (tmp_path / "exports").exists() or not list((tmp_path / "exports").iterdir())


def test_a_full_disk_in_the_teacher_cache_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "teachers" / "alpha.pt"
    disk = FullDisk(monkeypatch, tmp_path)
    value = torch.randn(64, 3)
    with pytest.raises(NoSpaceError, match=r"No space left on device writing .*alpha\.pt' \(it needs 768 B"):
        save_atomic(value, path)
    assert not list(path.parent.iterdir())
    disk.on = False  # space again: the next run builds it
    save_atomic(value, path)
    assert torch.equal(load_cached(path), value)


def test_a_full_disk_for_a_report_or_a_built_expert_leaves_nothing(tmp_path, monkeypatch):
    FullDisk(monkeypatch, tmp_path)
    with pytest.raises(NoSpaceError, match=r"report_test\.json"):
        write_report([TaskResult("a", 4, 1.0, 0.5)], tmp_path, "test")

    def build(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"x" * 1000)

    with pytest.raises(NoSpaceError, match=r"expert-a' \(it needs more than 16 B"):
        build_once(tmp_path / "expert-a", "done.json", "expert", build)
    assert not list(tmp_path.iterdir())


def test_library_wrappers_and_quota_are_recognised(tmp_path):
    from safetensors import SafetensorError

    wrapped = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert find_no_space(wrapped) is wrapped and find_no_space(RuntimeError("unexpected pos")) is None
    with (
        pytest.raises(NoSpaceError, match=r"^Disk quota exceeded writing"),
        no_space_is_one_line(tmp_path, 10),
    ):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(PermissionError), no_space_is_one_line(tmp_path):  # other errors pass through
        raise PermissionError(errno.EACCES, "denied")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 kB tmpfs, filled to the last byte; skipped where mounting is not permitted."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as err:  # no mount command
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_a_real_full_tmpfs(small_tmpfs):
    """Real errors, not injected ones: torch.save's RuntimeError, matplotlib's partial PNG, safetensors."""
    io_ = SafeCheckpointIO()
    io_.save_checkpoint({"global_step": 1, "w": torch.ones(4)}, small_tmpfs / "last.ckpt")
    fill(small_tmpfs)
    with pytest.raises(NoSpaceError, match=r"last\.ckpt' \(it needs .* free there\)"):
        io_.save_checkpoint({"global_step": 2, "w": torch.ones(40_000)}, small_tmpfs / "last.ckpt")
    assert io_.load_checkpoint(small_tmpfs / "last.ckpt")["global_step"] == 1  # the previous one, intact
    with pytest.raises(NoSpaceError, match=r"alpha\.pt"):
        save_atomic(torch.randn(20_000), small_tmpfs / "alpha.pt")
    with pytest.raises(NoSpaceError, match=r"c\.png"):
        plot_coefficients(
            torch.randn(2, 300), ["a", "b"], [f"g{i}" for i in range(300)], small_tmpfs / "c.png"
        )

    def build(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({"w": torch.ones(50_000)}, str(folder / "model.safetensors"))

    with pytest.raises(NoSpaceError, match="expert-a"):
        build_once(small_tmpfs / "expert-a", "done.json", "expert", build)
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler", "last.ckpt"]
