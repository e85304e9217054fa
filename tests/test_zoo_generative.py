"""Generative demo tasks (divmerge.zoo.gen_tasks): the demo's text as prompts with answer words, and
bbc headline generation."""

import pytest

from divmerge.data import TaskSpec, load_rows, load_splits
from divmerge.errors import DivMergeError
from divmerge.zoo import DEMO_TASKS, HEADLINE_TASK, answer_words, demo_split, generative_table
from divmerge.zoo.gen_tasks import PROMPT_WORDS, headline_and_opening


def _spec(source: str, **sizes) -> TaskSpec:
    return TaskSpec(
        name="t",
        source=source,
        kind="generative",
        prompt_template="Text: {text}\nAnswer:",
        answer_column="answer",
        **sizes,
    )


@pytest.mark.parametrize("name", DEMO_TASKS)
def test_label_word_tasks_answer_with_the_class_word_of_the_same_row(name):
    table = generative_table(name)
    _, pool = demo_split(name)
    assert list(table.columns) == ["text", "answer", "prompt"] and len(table) == len(pool)
    assert table["text"].tolist() == list(pool.texts)
    words = answer_words(pool.label_names)
    assert table["answer"].tolist() == [words[label] for label in pool.labels]
    assert len(set(words)) == len(pool.label_names) and all(w.islower() for w in words)


def test_prompts_are_the_first_words_then_the_question_that_names_every_answer():
    for name in (*DEMO_TASKS, HEADLINE_TASK):
        table = generative_table(name)
        row = table.iloc[0]
        assert row["prompt"].startswith(" ".join(row["text"].split()[:PROMPT_WORDS]) + "\n")
        assert len(row["prompt"].split("\n")[0].split()) <= PROMPT_WORDS
        if name != HEADLINE_TASK:
            question = row["prompt"].rsplit("\n", 1)[1]
            assert all(word in question for word in set(table["answer"])), name


def test_the_train_part_is_the_experts_rows_and_never_the_pool():
    train_rows, pool_rows = demo_split("sms_spam")
    assert generative_table("sms_spam", "train")["text"].tolist() == list(train_rows.texts)
    assert generative_table("sms_spam")["text"].tolist() == list(pool_rows.texts)


def test_a_generative_zoo_task_cuts_like_its_classification_twin():
    sizes = {"num_test": 40, "num_val": 10, "num_unlabelled": 20}
    gen = load_splits(_spec("zoo:trec", **sizes), seed=0)
    cls = load_splits(TaskSpec(name="t", source="zoo:trec", **sizes), seed=0)
    words = ("abbreviation", "description", "entity", "human", "location", "number")
    assert gen["test"].texts == [f"Text: {t}\nAnswer:" for t in cls["test"].texts]
    assert gen["test"].answers == [words[label] for label in cls["test"].labels]
    assert gen["unlabelled"].answers is None and len(gen["unlabelled"].texts) == 20


def test_headline_and_opening_paragraph():
    article = "US duo in first spam conviction\n\nA brother and sister were convicted.\n\nIt is the first."
    assert headline_and_opening(article) == (
        "US duo in first spam conviction",
        "A brother and sister were convicted.",
    )
    assert headline_and_opening("Only a headline\n") == ("Only a headline", "")


def test_bbc_headline_task_pairs_each_opening_paragraph_with_its_headline():
    table = generative_table(HEADLINE_TASK)
    _, pool = demo_split("bbc")
    assert len(table) > 0.95 * len(pool)
    first = next(t for t in pool.texts if headline_and_opening(t)[1])
    assert table["answer"].iloc[0] == first.split("\n", 1)[0].strip()
    assert table["text"].iloc[0] in first and table["answer"].iloc[0] not in table["text"].iloc[0][:5]
    assert all(a and "\n" not in a for a in table["answer"]) and all(t for t in table["text"])
    assert table["text"].str.len().mean() > 3 * table["answer"].str.len().mean()  # paragraph vs headline
    rows = load_rows(_spec(f"zoo:{HEADLINE_TASK}"), labelled=True)
    assert rows.answers[0] == table["answer"].iloc[0]


def test_headline_task_as_classification_and_unknown_generative_task_are_refused():
    with pytest.raises(DivMergeError, match="free-text generation: set kind: generative"):
        load_rows(TaskSpec(name="t", source=f"zoo:{HEADLINE_TASK}"))
    with pytest.raises(DivMergeError, match=r"Unknown generative demo task 'nope'.*bbc_headline"):
        load_rows(_spec("zoo:nope"), labelled=True)
