"""The six extra demo tasks (divmerge/zoo/extra_tasks.py): counts, cleaning, and that they are distinct."""

from collections import Counter

import pytest

from divmerge.zoo import DEMO_TASKS, EXTRA_TASKS, demo_split, load_demo_task
from divmerge.zoo.extra_tasks import clean

# task -> (label names, rows per class), after cleaning
EXPECTED = {
    "election": (("clinton", "trump"), (3108, 3089)),
    "reuters": (("acq", "crude", "earn", "money-fx", "trade"), (2285, 366, 3915, 280, 312)),
    "ng_sci": (("crypt", "electronics", "med", "space"), (991, 983, 989, 983)),
    "ng_rec": (("autos", "baseball", "hockey", "motorcycles"), (988, 994, 999, 993)),
    "health_tweets": (("bbc", "goodhealth", "nytimes", "reuters"), (3918, 7444, 6189, 4541)),
    "subjectivity": (("objective", "subjective"), (1083, 1097)),
}


def test_twelve_tasks_in_all():
    assert set(EXTRA_TASKS) == set(EXPECTED) and not set(EXTRA_TASKS) & set(DEMO_TASKS)


@pytest.mark.parametrize("name", EXTRA_TASKS)
def test_row_and_class_counts(name):
    data = load_demo_task(name)
    names, per_class = EXPECTED[name]
    assert data.label_names == names == tuple(sorted(names))
    counts = Counter(data.labels)
    assert tuple(counts[i] for i in range(len(names))) == per_class
    assert len(set(data.texts)) == len(data.texts)  # no duplicates
    assert all(t.strip() for t in data.texts)
    if name in ("election", "health_tweets"):  # links dropped from tweets
        assert not any("://" in t for t in data.texts)
    train, pool = demo_split(name)  # room for an expert (1,000 rows) and test / val / unlabelled
    assert len(train) == 1000 and len(pool) >= 1000


def test_clean_drops_empty_duplicate_and_ambiguous_texts():
    rows = [("a  b", "x"), ("", "x"), ("a b", "x"), ("c", "x"), ("c", "y"), ("d", "y")]
    assert clean(rows) == (["a b", "d"], ["x", "y"])
