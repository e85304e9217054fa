"""More bad input (issue 31): one clear line, exit code 2, nothing left behind; kill -9 debris cleaned."""

import os
import pathlib
import shutil
import socket
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

import train
from divmerge.errors import DivMergeError
from divmerge.experts.sources import resolve_source
from tests.test_bad_input import cfg
from tests.test_checkpoint_safety import Payload
from tests.test_cli import expect_error, write_config


def one_error_line(err: str) -> str:
    """The error as the only line on stderr (no usage dump, no traceback, no second line)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("divmerge: error:"), err
    return lines[0]


def copy_model(source: str, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def with_expert(tmp_path: Path, tiny: dict, path: str) -> str:
    return cfg(tmp_path, tiny, edit=lambda c: c["model"]["experts"].update(alpha=path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny) -> Path:
    """A divmerge checkpoint at epoch 2 (three epochs of the tiny setup), shared read-only."""
    root = tmp_path_factory.mktemp("trained")
    train.main(["fit", "--config", write_config(root, tiny, epochs=3)])
    return root / "run" / "ckpt" / "last.ckpt"


# --- tracebacks that became one line ---------------------------------------------------------------


def test_base_whose_config_is_not_json(tmp_path, tiny, capsys):
    base = copy_model(tiny["base"], tmp_path / "base")
    (base / "config.json").write_text('{"model_type": "bert", ')
    config = cfg(tmp_path, tiny, edit=lambda c: c["model"].update(base=str(base)))
    err = expect_error(capsys, ["fit", "--config", config], "config.json is damaged")
    assert str(base) in one_error_line(err)
    assert not (tmp_path / "run").exists(), "a failed run left files behind"


def test_pickled_expert_is_refused_unopened(tmp_path, tiny, capsys):
    expert = copy_model(tiny["experts"]["alpha"], tmp_path / "bin_expert")
    state = load_file(expert / "model.safetensors")
    marker = tmp_path / "UNPICKLED"
    torch.save({**state, "payload": Payload(marker)}, expert / "pytorch_model.bin")  # runs code if unpickled
    (expert / "model.safetensors").unlink()
    err = expect_error(capsys, ["fit", "--config", with_expert(tmp_path, tiny, str(expert))], "pickled")
    line = one_error_line(err)
    assert "pytorch_model.bin" in line and "safetensors" in line and "weights_only" not in line
    assert not marker.exists(), "the .bin was unpickled"
    assert not (tmp_path / "run").exists()


def test_pickled_adapter_is_refused_unopened(tmp_path, tiny):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": tiny["base"], "r": 4}
    (adapter / "adapter_config.json").write_text(yaml.safe_dump(config))
    marker = tmp_path / "UNPICKLED"
    torch.save({"payload": Payload(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(DivMergeError, match=r"pickled adapter_model\.bin.*adapter_model\.safetensors"):
        resolve_source(str(adapter))
    assert not marker.exists()


def test_export_into_a_parent_it_cannot_write(tmp_path, tiny, capsys, monkeypatch):
    locked = tmp_path / "locked"
    mkdir = pathlib.Path.mkdir

    def refuse(self, *args, **kwargs):  # a read-only parent (chmod does not stop root, so refuse here)
        if self == locked or locked in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", refuse)
    args = ["export", "--config", cfg(tmp_path, tiny), "--model.method", "ties"]
    err = expect_error(capsys, [*args, "--out_dir", str(locked / "out")], "Permission denied")
    assert "choose a --out_dir where you can write" in one_error_line(err)


def test_ckpt_path_best_outside_a_fit(tmp_path, tiny, capsys):
    err = expect_error(capsys, ["test", "--config", cfg(tmp_path, tiny), "--ckpt_path", "best"], "best")
    assert "pass the checkpoint file" in one_error_line(err)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: c.update(state_dict={}), "state_dict lacks ['merged.coefficients.weight']"),
        (lambda c: c["divmerge"].pop("fingerprint"), "divmerge entry lacks ['fingerprint']"),
    ],
    ids=["state-dict-key", "fingerprint"],
)
@pytest.mark.parametrize("subcommand", ["test", "fit", "export"])
def test_checkpoint_missing_a_key(tmp_path, tiny, capsys, trained, damage, message, subcommand):
    checkpoint = torch.load(trained, weights_only=True)
    damage(checkpoint)
    ckpt = tmp_path / "damaged.ckpt"
    torch.save(checkpoint, ckpt)
    args = [subcommand, "--config", cfg(tmp_path, tiny), "--ckpt_path", str(ckpt)]
    if subcommand == "export":
        args += ["--out_dir", str(tmp_path / "out")]
    expect_error(capsys, args, message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_resume_past_max_epochs(tmp_path, tiny, capsys, trained):
    args = ["fit", "--config", cfg(tmp_path, tiny), "--ckpt_path", str(trained), "--trainer.max_epochs", "1"]
    err = expect_error(capsys, args, "past trainer.max_epochs 1")
    assert "raise trainer.max_epochs" in err and "Traceback" not in err


# --- misleading or noisy lines -------------------------------------------------------------------


def test_random_bytes_are_not_a_checkpoint(tmp_path, tiny, capsys):
    ckpt = tmp_path / "random.ckpt"
    ckpt.write_bytes(os.urandom(4096))
    err = expect_error(capsys, ["test", "--config", cfg(tmp_path, tiny), "--ckpt_path", str(ckpt)], "not a ")
    assert "not a checkpoint" in err and "could run code" not in err


def test_expert_folder_without_weights(tmp_path, tiny, capsys):
    expert = copy_model(tiny["experts"]["alpha"], tmp_path / "no_weights")
    (expert / "model.safetensors").unlink()
    err = expect_error(
        capsys, ["fit", "--config", with_expert(tmp_path, tiny, str(expert))], "no weights file"
    )
    assert "HF_HUB_OFFLINE" not in err


def test_hub_id_in_offline_mode(tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = with_expert(tmp_path, tiny, "someone/not-a-cached-model")
    err = expect_error(capsys, ["fit", "--config", config], "offline mode is on (HF_HUB_OFFLINE=1)")
    one_error_line(err)


def write_text(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda p, c: ["--config", write_text(p, "model:\n\tlr: 0.1\n")], "has a tab on line 2"),
        (lambda p, c: ["--config", write_text(p, "")], "is empty"),
        (lambda p, c: ["--config", write_text(p, "model: [1, 2\n")], "is not valid YAML (did not find"),
        (lambda p, c: ["--config", c, "--model.granularity", "nope"], "'nope', which is not one of 'task'"),
    ],
    ids=["tab", "empty", "yaml-syntax", "wrong-literal"],
)
def test_config_errors_are_one_line(tmp_path, tiny, capsys, make_args, message):
    err = expect_error(capsys, ["fit", *make_args(tmp_path, cfg(tmp_path, tiny))], message)
    assert "usage:" not in one_error_line(err)


def test_duplicate_label_names(tmp_path, tiny, capsys):
    table = pd.read_csv(tiny["data"]["alpha"])
    table["label"] = table["label"].map({0: "neg", 1: "pos"})
    source = tmp_path / "named.csv"
    table.to_csv(source, index=False)
    spec = {"source": str(source), "label_names": ["neg", "pos", "neg"]}
    config = cfg(tmp_path, tiny, edit=lambda c: c["data"]["tasks"][0].update(spec))
    err = expect_error(capsys, ["fit", "--config", config], "names ['neg'] more than once")
    assert "not in label_names" not in err


def test_fifo_data_file(tmp_path, tiny, capsys):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    config = cfg(tmp_path, tiny, edit=lambda c: c["data"]["tasks"][0].update(source=str(fifo)))
    err = expect_error(capsys, ["fit", "--config", config], "is not a regular file")
    assert "does not exist" not in err


def not_empty_warnings(config: str) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(["fit", "--config", config])
    return [str(w.message) for w in caught if "exists and is not empty" in str(w.message)]


def test_fresh_fit_does_not_warn_about_its_own_lock(tmp_path, tiny):
    config = cfg(tmp_path, tiny)
    assert not_empty_warnings(config) == []
    assert len(not_empty_warnings(config)) == 1  # a directory that holds checkpoints still warns


# --- debris after kill -9 ------------------------------------------------------------------------


def test_debris_of_killed_runs_is_cleaned_by_the_next_run(tmp_path, tiny):
    config = cfg(tmp_path, tiny)
    host = socket.gethostname()
    teachers, ckpt_dir = tmp_path / "cache" / "teachers", tmp_path / "run" / "ckpt"
    teachers.mkdir(parents=True)
    ckpt_dir.mkdir(parents=True)
    dead = [
        teachers / f".alpha-unlabelled-v2-x-y.pt.999999999@{host}.tmp",  # killed writing a teacher
        ckpt_dir / f".last.ckpt.999999999@{host}.tmp",  # killed writing a checkpoint
        ckpt_dir / ".last.ckpt.tmp",  # the same, by an earlier divmerge (no pid in the name)
    ]
    kept = [
        teachers / f".beta-val-v2-x-y.pt.{os.getpid()}@{host}.tmp",  # a live run's
        teachers / ".beta-val-v2-x-y.pt.999999999@another-host.tmp",  # another host's (shared disk)
    ]
    legacy = teachers / "tmpab12cd34.tmp"  # an earlier divmerge's (mkstemp, no pid), an hour old
    for path in [*dead, *kept, legacy]:
        path.write_bytes(b"partial")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    dead.append(legacy)
    train.main(["fit", "--config", config])
    assert [p for p in dead if p.exists()] == [] and all(p.exists() for p in kept)
    assert (ckpt_dir / "last.ckpt").is_file() and len(list(teachers.glob("*.pt"))) == 6
