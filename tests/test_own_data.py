"""A user's own data: pre-split files, sizes chosen from the data, class names from the expert or a file."""

import json
import logging

import pandas as pd
import pytest

from divmerge.data import TaskSpec, cut_sizes, load_splits
from divmerge.errors import DivMergeError
from divmerge.experts.classes import expert_class_names
from divmerge.lightning.datamodule import MergeDataModule
from tests.tiny import make_expert


def write(path, rows: int, labels=("neg", "pos"), start: int = 0, label_column: str | None = "label"):
    table = {"text": [f"row {start + i} words" for i in range(rows)]}
    if label_column:
        table[label_column] = [labels[i % len(labels)] for i in range(rows)]
    pd.DataFrame(table).to_json(path, orient="records", lines=True)
    return str(path)


def sizes(parts) -> dict[str, int]:
    return {split: len(rows.texts) for split, rows in parts.items()}


def test_pre_split_files_are_used_as_they_are(tmp_path, caplog):
    spec = TaskSpec(
        "t",
        unlabelled=write(tmp_path / "train.jsonl", 300, label_column=None),  # no labels: never needed
        val=write(tmp_path / "val.jsonl", 250, start=1000),
        test=write(tmp_path / "test.jsonl", 30, start=2000),
        label_names=["neg", "pos"],
    )
    with caplog.at_level(logging.INFO, logger="divmerge"):
        parts = load_splits(spec, seed=0)
    assert sizes(parts) == {"unlabelled": 256, "val": 200, "test": 30}
    assert parts["test"].texts == [f"row {2000 + i} words" for i in range(30)]  # all, in file order
    assert parts["test"].labels == [i % 2 for i in range(30)] and parts["unlabelled"].labels is None
    assert set(parts["val"].texts) <= {f"row {1000 + i} words" for i in range(250)}
    assert "unlabelled 256 of 300 rows of" in caplog.text and "test all 30 rows of" in caplog.text
    again = load_splits(spec, seed=0)
    assert (
        again["val"].texts == parts["val"].texts and load_splits(spec, 1)["val"].texts != parts["val"].texts
    )


def test_explicit_sizes_sample_a_file_and_too_many_is_refused(tmp_path):
    files = {"unlabelled": write(tmp_path / "u.jsonl", 50), "test": write(tmp_path / "t.jsonl", 40, start=99)}
    parts = load_splits(TaskSpec("t", **files, num_unlabelled=10, num_test=25, label_names=["neg", "pos"]), 0)
    assert sizes(parts) == {"unlabelled": 10, "val": 0, "test": 25}
    with pytest.raises(
        DivMergeError, match=r"num_test is 41 but '.*t.jsonl' has 40 rows; lower it or leave it"
    ):
        load_splits(TaskSpec("t", **files, num_test=41, label_names=["neg", "pos"]), 0)


def test_a_test_file_beside_a_source_that_is_cut(tmp_path):
    spec = TaskSpec(
        "t", source=write(tmp_path / "pool.jsonl", 600), test=write(tmp_path / "t.jsonl", 20, start=5000)
    )
    parts = load_splits(TaskSpec(**{**spec.__dict__, "label_names": ["neg", "pos"]}), 0)
    assert sizes(parts) == {"unlabelled": 256, "val": 200, "test": 20}
    assert not set(parts["val"].texts) & set(parts["unlabelled"].texts)


@pytest.mark.parametrize(
    ("rows", "given", "want"),
    [
        (2000, {}, {"test": 500, "val": 200, "unlabelled": 256}),  # the demo's sizes when they fit
        (900, {}, {"test": 470, "val": 188, "unlabelled": 242}),  # the same proportions, all rows used
        (900, {"num_unlabelled": 600}, {"test": 214, "val": 85, "unlabelled": 600}),
        (10, {"num_val": 0}, {"test": 6, "unlabelled": 4}),
    ],
)
def test_sizes_not_given_are_chosen_from_the_data(rows, given, want):
    assert cut_sizes(TaskSpec("t", source="x.csv", **given), rows) == want


def test_a_900_row_file_with_a_two_line_task_entry_works(tmp_path, caplog):
    spec = TaskSpec("t", source=write(tmp_path / "all.jsonl", 900), label_names=["neg", "pos"])
    with caplog.at_level(logging.INFO, logger="divmerge"):
        parts = load_splits(spec, 0)
    assert sizes(parts) == {"unlabelled": 242, "val": 188, "test": 470}
    assert "test 470 / val 188 / unlabelled 242 rows cut from" in caplog.text and "num_test" in caplog.text


def test_hub_splits_by_name(tmp_path, monkeypatch):
    import datasets

    read = []

    def load_dataset(name, subset, split):
        read.append((name, subset, split))
        return datasets.Dataset.from_dict({"text": [f"{split} {i}" for i in range(30)], "label": [0, 1] * 15})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr("divmerge.data.check_available", lambda *args: None)
    spec = TaskSpec("t", source="someone/glue", hub_subset="sst2", unlabelled="train", test="validation")
    parts = load_splits(TaskSpec(**{**spec.__dict__, "num_val": 0}), 0)
    assert sorted(read) == [("someone/glue", "sst2", "train"), ("someone/glue", "sst2", "validation")]
    assert parts["test"].texts[0] == "validation 0" and sizes(parts)["unlabelled"] == 30


def test_bad_split_entries(tmp_path):
    with pytest.raises(DivMergeError, match=r"has no data: give source .* or unlabelled"):
        load_splits(TaskSpec("t", test=write(tmp_path / "t.jsonl", 5)), 0)
    with pytest.raises(DivMergeError, match="num_unlabelled is 0: it must be at least 1"):
        load_splits(TaskSpec("t", unlabelled=write(tmp_path / "u.jsonl", 5), num_unlabelled=0), 0)
    with pytest.raises(DivMergeError, match="demo task 'zoo:rt' has no named splits"):
        load_splits(TaskSpec("t", source="zoo:rt", test="validation"), 0)
    with pytest.raises(
        DivMergeError, match=r"label column 'label' is not in .*remove test: to skip that split"
    ):
        unlabelled = str(tmp_path / "u.jsonl")
        load_splits(
            TaskSpec("t", unlabelled=unlabelled, test=write(tmp_path / "n.jsonl", 5, label_column=None)), 0
        )


def test_class_names_come_from_the_experts_config(tmp_path, tiny, caplog):
    named = make_expert(tiny["base"], tmp_path / "named", 2, seed=3)
    config = json.loads((named / "config.json").read_text())
    config["id2label"] = {"0": "neg", "1": "pos"}
    (named / "config.json").write_text(json.dumps(config))
    assert expert_class_names(str(named)) == (["neg", "pos"], f"{named}/config.json (id2label)")
    assert expert_class_names(tiny["experts"]["alpha"]) is None  # LABEL_0, LABEL_1: placeholders
    files = {
        "unlabelled": write(tmp_path / "u.jsonl", 20),
        "test": write(tmp_path / "t.jsonl", 10, ("pos", "neg")),
    }
    dm = MergeDataModule([TaskSpec("alpha", **files)], tokenizer=tiny["base"], experts={"alpha": str(named)})
    with caplog.at_level(logging.INFO, logger="divmerge"):
        assert dm.rows("alpha")["test"].labels[:2] == [1, 0]
    assert f"task 'alpha': class names from {named}/config.json (id2label) (2 classes)" in caplog.text
    placeholder = MergeDataModule(
        [TaskSpec("alpha", **files)], tokenizer=tiny["base"], experts=tiny["experts"]
    )
    with pytest.raises(DivMergeError, match=r"config.json names no classes .*set label_names"):
        placeholder.rows("alpha")


@pytest.mark.parametrize("suffix", [".txt", ".json"])
def test_class_names_from_a_file(tmp_path, caplog, suffix):
    names = tmp_path / f"classes{suffix}"
    names.write_text(json.dumps(["neg", "pos"]) if suffix == ".json" else "neg\npos\n")
    files = {
        "unlabelled": write(tmp_path / "u.jsonl", 20),
        "test": write(tmp_path / "t.jsonl", 10, ("pos", "neg")),
    }
    with caplog.at_level(logging.INFO, logger="divmerge"):
        parts = load_splits(TaskSpec("t", **files, label_names=str(names)), 0)
    assert parts["test"].labels[:2] == [1, 0] and parts["test"].label_names == ("neg", "pos")
    assert f"class names from {names} (2 classes)" in caplog.text
    with pytest.raises(DivMergeError, match=r"label_names '.*missing.txt' is not a file"):
        load_splits(TaskSpec("t", **files, label_names=str(tmp_path / "missing.txt")), 0)
