"""Every bad input: one clear line naming the fix, exit code 2, and nothing written (README table)."""

import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

import train
from tests.test_cli import expect_error, write_config


def cfg(tmp_path: Path, tiny: dict, edit=None, **data_kw) -> str:
    path = Path(write_config(tmp_path, tiny, epochs=1, **data_kw))
    if edit:
        config = yaml.safe_load(path.read_text())
        edit(config)
        path.write_text(yaml.safe_dump(config))
    return str(path)


FLAG_ROWS = [
    (["--model.lr", "-1"], "model.lr is -1"),
    (["--data.batch_size_per_task", "0"], "data.batch_size_per_task is 0"),
    (["--data.eval_batch_size", "0"], "data.eval_batch_size is 0"),
    (["--data.max_length", "0"], "data.max_length is 0"),
    (["--data.max_length", "100"], "max_position_embeddings"),
    (["--trainer.strategy", "nope"], "Invalid trainer setting"),
    (["--trainer.accelerator", "tpu9"], "Invalid trainer setting"),
    (["--trainer.max_epochs", "-5"], "Invalid trainer setting"),
]


@pytest.mark.parametrize(("flags", "message"), FLAG_ROWS, ids=[" ".join(f) for f, _ in FLAG_ROWS])
def test_bad_settings(tmp_path, tiny, capsys, flags, message):
    expect_error(capsys, ["fit", "--config", cfg(tmp_path, tiny), *flags], message)
    assert not (tmp_path / "run").exists(), "a failed run left files behind"


def test_nan_init(tmp_path, tiny, capsys):
    config = cfg(tmp_path, tiny, edit=lambda c: c["model"].update(init=float("nan")))  # YAML .nan
    expect_error(capsys, ["fit", "--config", config], "model.init is nan")
    assert not (tmp_path / "run").exists()


def test_cache_dir_that_is_a_file(tmp_path, tiny, capsys):
    (tmp_path / "blocker").write_text("")
    args = ["fit", "--config", cfg(tmp_path, tiny), "--model.cache_dir", str(tmp_path / "blocker" / "c")]
    expect_error(capsys, args, "a file: choose a directory")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_cache_dir(tmp_path, tiny, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    args = ["fit", "--config", cfg(tmp_path, tiny), "--model.cache_dir", str(ro / "c")]
    expect_error(capsys, args, "not writable")


def test_checkpoint_directory_under_a_file(tmp_path, tiny, capsys):
    (tmp_path / "blocker").write_text("")
    place = str(tmp_path / "blocker" / "ckpt")
    config = cfg(
        tmp_path, tiny, edit=lambda c: c["trainer"]["callbacks"][0]["init_args"].update(dirpath=place)
    )
    expect_error(capsys, ["fit", "--config", config], "is under")
    assert not (tmp_path / "run").exists()


def test_base_given_as_an_expert(tmp_path, tiny, capsys):
    experts = {"alpha": tiny["base"], "beta": tiny["experts"]["beta"]}
    config = cfg(tmp_path, tiny, edit=lambda c: c["model"].update(experts=experts))
    expect_error(capsys, ["fit", "--config", config], "lacks trained weights")
    assert not (tmp_path / "run").exists()


def test_truncated_expert_weights(tmp_path, tiny, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(tiny["experts"]["alpha"]).iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[:500] if f.suffix == ".safetensors" else data)
    config = cfg(tmp_path, tiny, edit=lambda c: c["model"]["experts"].update(alpha=str(broken)))
    err = expect_error(capsys, ["fit", "--config", config], "truncated or corrupt")
    assert "'alpha'" in err and str(broken) in err


def test_checkpoint_path_that_is_a_directory(tmp_path, tiny, capsys):
    args = ["test", "--config", cfg(tmp_path, tiny), "--ckpt_path", str(tmp_path)]
    expect_error(capsys, args, "is a directory")


def test_checkpoint_of_another_granularity(tmp_path, tiny, capsys):
    config = cfg(tmp_path, tiny)
    train.main(["fit", "--config", config])
    ckpt = str(tmp_path / "run" / "ckpt" / "last.ckpt")
    for sub in ("test", "fit", "export"):
        args = [sub, "--config", config, "--model.granularity", "task", "--ckpt_path", ckpt]
        if sub == "export":
            args += ["--out_dir", str(tmp_path / "out")]
        expect_error(capsys, args, "layer-wise coefficients but the config asks for task-wise")
    assert not (tmp_path / "out").exists()


def write_table(tmp_path: Path, tiny: dict, name: str, edit) -> str:
    table = pd.read_csv(tiny["data"]["alpha"])
    edit(table)
    path = tmp_path / name
    if name.endswith(".json"):
        table.to_json(path, orient="records", lines=True)  # JSON lines under a .json name
    else:
        table.to_csv(path, index=False, sep="\t" if name == "tab.csv" else ",")
    return str(path)


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("nan.csv", lambda t: t.__setitem__("label", t["label"].where(t.index % 2 == 0)), "have no label"),
        ("frac.csv", lambda t: t.__setitem__("label", t["label"] + 0.5), "fractional values"),
        ("tab.csv", lambda t: None, "looks tab-separated; name it .tsv"),
        ("lines.json", lambda t: None, "name it .jsonl"),
    ],
    ids=["nan-labels", "fractional-labels", "tsv-as-csv", "jsonl-as-json"],
)
def test_bad_data_files(tmp_path, tiny, capsys, name, edit, message):
    source = write_table(tmp_path, tiny, name, edit)
    config = cfg(tmp_path, tiny, edit=lambda c: c["data"]["tasks"][0].update(source=source))
    expect_error(capsys, ["fit", "--config", config], message)
    assert not (tmp_path / "run").exists()


def test_rows_without_text_are_counted(tmp_path, tiny, caplog):
    def blank(table):
        table.loc[::3, "text"] = None

    source = write_table(tmp_path, tiny, "blank.csv", blank)
    config = cfg(tmp_path, tiny, edit=lambda c: c["data"]["tasks"][0].update(source=source))
    train.main(["fit", "--config", config, "--trainer.max_epochs", "0"])
    assert "dropped 20 of 60 rows with no text" in caplog.text


def test_export_under_a_file(tmp_path, tiny, capsys):
    (tmp_path / "blocker").write_text("")
    args = ["export", "--config", cfg(tmp_path, tiny), "--model.method", "ties"]
    expect_error(
        capsys, [*args, "--out_dir", str(tmp_path / "blocker" / "out")], "a file: choose a directory"
    )


def test_a_second_live_run_on_the_same_checkpoint_directory(tmp_path, tiny, capsys):
    config = cfg(tmp_path, tiny)
    ckpt_dir = tmp_path / "run" / "ckpt"
    ckpt_dir.mkdir(parents=True)
    lock = ckpt_dir / ".divmerge.lock"
    lock.write_text(f"{os.getppid()} {os.uname().nodename}")  # a live process on this host
    expect_error(capsys, ["fit", "--config", config], "Another divmerge run")
    assert lock.exists()  # not ours to remove
    lock.write_text(f"999999999 {os.uname().nodename}")  # left by a dead process: taken over
    train.main(["fit", "--config", config])
    assert (ckpt_dir / "last.ckpt").is_file() and not lock.exists()


def test_expert_file_missing_a_tensor_the_others_have(tmp_path, tiny, capsys):
    from safetensors.torch import load_file, save_file

    short = tmp_path / "short"
    short.mkdir()
    for f in Path(tiny["experts"]["alpha"]).iterdir():
        if f.suffix != ".safetensors":
            (short / f.name).write_bytes(f.read_bytes())
            continue
        tensors = load_file(f)
        dropped = next(n for n in sorted(tensors) if "layer.0." in n and n.endswith("weight"))
        del tensors[dropped]
        save_file(tensors, short / f.name, metadata={"format": "pt"})
    config = cfg(tmp_path, tiny, edit=lambda c: c["model"]["experts"].update(alpha=str(short)))
    err = expect_error(capsys, ["fit", "--config", config], "lacks trained weights")
    assert dropped.split(".", 1)[-1] in err and "'alpha'" in err
    assert not (tmp_path / "run").exists()
