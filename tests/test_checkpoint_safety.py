"""A checkpoint is data: a crafted .ckpt must never run code on any entry point (issue 11, part 1)."""

import builtins
from pathlib import Path

import pytest
import torch

import train
from tests.test_cli import expect_error, write_config


class Payload:
    """Unpickling this object opens (creates) ``marker``: proof that the file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "divmerge": {"fingerprint": "x"}, "payload": Payload(marker)}, path)
    return path


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "export", "last"])
def test_a_planted_payload_never_runs(tmp_path, tiny, capsys, subcommand):
    config = write_config(tmp_path, tiny, epochs=1)
    marker = tmp_path / "PAYLOAD_RAN"
    if subcommand == "last":  # found by --ckpt_path last in the checkpoint directory
        plant(tmp_path / "run" / "ckpt" / "last.ckpt", marker)
        args = ["fit", "--config", config, "--ckpt_path", "last"]
    elif subcommand == "export":
        ckpt = plant(tmp_path / "evil.ckpt", marker)
        args = ["export", "--config", config, "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "out")]
    else:
        ckpt = plant(tmp_path / "evil.ckpt", marker)
        args = [subcommand, "--config", config, "--ckpt_path", str(ckpt)]
    expect_error(capsys, args, "could run code")
    assert not marker.exists(), "the checkpoint ran code"
    assert not (tmp_path / "out").exists()


def test_the_payload_would_run_under_a_plain_unpickle(tmp_path):
    """The planted file really is a payload (so the test above can fail)."""
    marker = tmp_path / "PAYLOAD_RAN"
    ckpt = plant(tmp_path / "evil.ckpt", marker)
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_divmerge_checkpoints_load_as_data(tmp_path, tiny):
    train.main(["fit", "--config", write_config(tmp_path, tiny, epochs=1)])
    state = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    assert "divmerge" in state and list(state["state_dict"]) == ["merged.coefficients.weight"]
