"""The four more demo tasks (divmerge/zoo/more_tasks.py): counts, cleaning, many classes, distinctness."""

from collections import Counter

import pytest

from divmerge.errors import DivMergeError
from divmerge.zoo import DEMO_TASKS, EXTRA_TASKS, MORE_TASKS, demo_split, load_demo_task
from divmerge.zoo.more_tasks import MORE_LABELS, icd10_chapter

# task -> (number of classes, rows, smallest class, largest class), after cleaning
EXPECTED = {
    "reuters_minor": (37, 1789, 10, 245),
    "icd10": (21, 6300, 300, 300),
    "ng_comp": (5, 4851, 962, 980),
    "ng_talk": (6, 5047, 628, 996),
}
# a new task and an older one drawn from the same file: they share no text
SAME_SOURCE = {"reuters_minor": "reuters", "ng_comp": "ng_sci", "ng_talk": "ng_rec"}


def test_sixteen_tasks_in_all():
    every = (*DEMO_TASKS, *EXTRA_TASKS, *MORE_TASKS)
    assert set(MORE_TASKS) == set(EXPECTED) and len(set(every)) == len(every) == 16


@pytest.mark.parametrize("name", MORE_TASKS)
def test_row_and_class_counts(name):
    data = load_demo_task(name)
    num_classes, rows, smallest, largest = EXPECTED[name]
    assert data.label_names == MORE_LABELS[name] == tuple(sorted(data.label_names))
    counts = Counter(data.labels)
    assert len(data) == rows and len(counts) == len(data.label_names) == num_classes  # every class present
    assert (min(counts.values()), max(counts.values())) == (smallest, largest)
    assert len(set(data.texts)) == len(data.texts)  # no duplicates
    assert all(t.strip() for t in data.texts)
    if name in SAME_SOURCE:
        assert not set(data.texts) & set(load_demo_task(SAME_SOURCE[name]).texts)
    train, pool = demo_split(name)  # an expert's 1,000 rows, and test / val / 512 unlabelled beside them
    assert len(train) == 1000 and len(pool) >= 776
    again, _ = demo_split(name)
    assert again.texts == train.texts and again.labels == train.labels


def test_the_many_class_task_has_tens_of_classes_and_a_thin_train_set():
    train, _ = demo_split("reuters_minor")
    per_class = Counter(train.labels)
    assert len(MORE_LABELS["reuters_minor"]) >= 30 and min(per_class.values()) < 10


def test_icd10_chapters_by_code():
    cases = {"A000": "infectious", "D3A00": "neoplasms", "D499": "neoplasms", "D500": "blood"}
    cases |= {"H5789": "eye", "H600": "ear", "S62313B": "injury", "V0100": "external_causes"}
    assert {code: icd10_chapter(code) for code in cases} == cases
    assert icd10_chapter("U071") is None


def test_unknown_task_lists_the_new_ones():
    with pytest.raises(DivMergeError, match="ng_talk"):
        load_demo_task("ng_nope")


def test_benchmark_sweeps_all_sixteen_tasks():
    from benchmarks import merge_quality as mq

    settings = mq.resolve_settings(mq.build_parser().parse_args(["--tasks", "all"]))
    assert settings.tasks == [*DEMO_TASKS, *EXTRA_TASKS, *MORE_TASKS] and settings.max_k == 16
    assert settings.experts["reuters_minor"] == "zoo:reuters_minor"
    settings = mq.resolve_settings(mq.build_parser().parse_args(["--tasks", "rt,icd10"]))
    assert settings.tasks == ["rt", "icd10"]
