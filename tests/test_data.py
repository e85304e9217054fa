from types import SimpleNamespace

import pandas as pd
import pytest

from divmerge.data import TaskSpec, load_rows, split_rows
from divmerge.errors import DivMergeError
from divmerge.lightning.datamodule import MergeDataModule


def spec(path, **kw):
    return TaskSpec(
        name="alpha", source=str(path), **{"num_unlabelled": 20, "num_val": 10, "num_test": 10, **kw}
    )


def test_splits_are_disjoint_deterministic_and_sized(tiny):
    s = spec(tiny["data"]["alpha"])
    rows = load_rows(s)
    a, b = split_rows(s, rows, seed=0), split_rows(s, rows, seed=0)
    assert {k: len(v.texts) for k, v in a.items()} == {"test": 10, "val": 10, "unlabelled": 20}
    assert a["test"].texts == b["test"].texts and a["unlabelled"].texts == b["unlabelled"].texts
    assert a["unlabelled"].labels is None and len(a["val"].labels) == 10
    c = split_rows(s, rows, seed=1)
    assert c["test"].texts != a["test"].texts


def test_split_indices_never_overlap():
    texts = [f"row {i}" for i in range(100)]
    from divmerge.data import Rows

    parts = split_rows(
        TaskSpec("t", "x.csv", num_unlabelled=50, num_val=20, num_test=30),
        Rows(texts, list(range(100)), None),
        3,
    )
    seen = [set(p.texts) for p in parts.values()]
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 100


def test_string_labels_need_label_names(tmp_path):
    path = tmp_path / "s.csv"
    pd.DataFrame({"text": ["a b", "c d", "e f"] * 10, "label": ["neg", "pos", "neg"] * 10}).to_csv(
        path, index=False
    )
    with pytest.raises(DivMergeError, match="label_names"):
        load_rows(spec(path, num_unlabelled=5))
    rows = load_rows(spec(path, num_unlabelled=5, label_names=["neg", "pos"]))
    assert rows.labels[:3] == [0, 1, 0]
    with pytest.raises(DivMergeError, match=r"\['pos'\] are not in label_names"):
        load_rows(spec(path, num_unlabelled=5, label_names=["neg", "neutral"]))


def test_empty_data(tmp_path):
    path = tmp_path / "e.csv"
    pd.DataFrame({"text": [], "label": []}).to_csv(path, index=False)
    s = spec(path)
    with pytest.raises(DivMergeError, match="no examples"):
        split_rows(s, load_rows(s), 0)


def test_missing_label_column(tiny):
    with pytest.raises(DivMergeError, match=r"label column 'sentiment' is not in .*num_val: 0"):
        load_rows(spec(tiny["data"]["alpha"], label_column="sentiment"))
    rows = load_rows(spec(tiny["data"]["alpha"], label_column="sentiment", num_val=0, num_test=0))
    assert rows.labels is None


def test_missing_text_column_and_file(tiny, tmp_path):
    with pytest.raises(DivMergeError, match="text column 'body'"):
        load_rows(spec(tiny["data"]["alpha"], text_column="body"))
    with pytest.raises(DivMergeError, match="does not exist"):
        load_rows(spec(tmp_path / "missing.csv"))
    with pytest.raises(DivMergeError, match=r"neither a local data file nor a hub|offline mode is on"):
        load_rows(TaskSpec("x", "someone/no-such-dataset"))


def test_too_few_rows(tiny):
    s = spec(tiny["data"]["alpha"], num_unlabelled=1000)
    with pytest.raises(DivMergeError, match="lower num_test"):
        split_rows(s, load_rows(s), 0)


def test_unknown_demo_task():
    with pytest.raises(DivMergeError, match="sms_spam"):
        load_rows(TaskSpec("x", "zoo:no_such_task"))


def test_datamodule_batches_every_task(tiny):
    tasks = [TaskSpec(n, p, num_unlabelled=20, num_val=10, num_test=10) for n, p in tiny["data"].items()]
    dm = MergeDataModule(tasks, tokenizer=tiny["base"], batch_size_per_task=4, max_length=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))[0]
    assert set(batch) == {"alpha", "beta"}
    assert batch["alpha"]["input_ids"].shape[0] == 4 and batch["alpha"]["input_ids"].shape[1] <= 16
    assert "labels" not in batch["alpha"]
    val = dm.val_dataloader()
    assert len(val) == 2 and "labels" in next(iter(val[0]))


def test_an_evaluation_split_smaller_than_the_processes_is_refused(tiny):
    """2 test examples per task on 3 processes: the third would score none and hang the others."""
    tasks = [TaskSpec(n, p, num_unlabelled=20, num_val=3, num_test=2) for n, p in tiny["data"].items()]
    dm = MergeDataModule(tasks, tokenizer=tiny["base"], batch_size_per_task=4, max_length=16)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=3, global_rank=2)  # what the loaders read of the trainer
    assert len(dm.val_dataloader()) == 2  # 3 val examples: one each
    with pytest.raises(DivMergeError, match="test split has at most 2 examples per task, fewer than the 3"):
        dm.test_dataloader()


def test_datamodule_rejects_duplicates_and_empty():
    with pytest.raises(DivMergeError, match="No tasks"):
        MergeDataModule([])
    with pytest.raises(DivMergeError, match="unique"):
        MergeDataModule([TaskSpec("a", "x.csv"), TaskSpec("a", "y.csv")])
