"""Generative demo tasks: the demo's labelled text as prompts with answers, for causal-LM experts.

A generative task (``kind: generative``) with ``source: zoo:<task>`` reads the same held-out pool as the
classification demo task, as a table with two columns: ``text`` (the input) and ``answer`` (the label as
a word, e.g. ``positive``), so ``prompt_template`` and ``answer_column: answer`` work as on a data file.
``zoo:bbc_headline`` is free-text generation: ``text`` is a BBC article's opening paragraph and
``answer`` its headline (each article file's first line), scored with a text metric (ROUGE-L, chrF).
"""

import pandas as pd

from divmerge.errors import DivMergeError
from divmerge.zoo.demo import DEMO_TASKS, demo_split

HEADLINE_TASK = "bbc_headline"
"""``zoo:bbc_headline``: the free-text task (headline from the opening paragraph)."""

_SPELT_OUT = {  # trec's coarse class codes as answer words
    "ABBR": "abbreviation",
    "DESC": "description",
    "ENTY": "entity",
    "HUM": "human",
    "LOC": "location",
    "NUM": "number",
}

GENERATIVE_TASKS: tuple[str, ...] = (*DEMO_TASKS, HEADLINE_TASK)
"""Every task ``zoo:<name>`` serves to generative tasks."""


def answer_words(label_names: tuple[str, ...]) -> tuple[str, ...]:
    """The answer word of each class of a demo task: its class name, trec's codes spelt out.

    Args:
        label_names: The task's class names, in class-id order.

    Returns:
        One word per class, in the same order.
    """
    return tuple(_SPELT_OUT.get(n, n) for n in label_names)


def headline_and_opening(article: str) -> tuple[str, str]:
    """Split a BBC article file's text into its headline (first line) and opening paragraph.

    Args:
        article: The file's text: the headline, a blank line, then paragraphs separated by blank lines.

    Returns:
        ``(headline, opening paragraph)``, whitespace stripped; the paragraph is empty if there is none.
    """
    headline, _, body = article.strip().partition("\n")
    paragraphs = [p.strip() for p in body.split("\n\n") if p.strip()]
    return headline.strip(), paragraphs[0] if paragraphs else ""


def generative_table(name: str) -> pd.DataFrame:
    """The held-out pool of a demo task as prompts' inputs and answers.

    Args:
        name: A demo task (answers are its label words) or ``bbc_headline``.

    Returns:
        A table with columns ``text`` and ``answer``, in the pool's order (rows the demo's classification
        experts never trained on).

    Raises:
        DivMergeError: If ``name`` is not a generative demo task.
    """
    if name == HEADLINE_TASK:
        _, pool = demo_split("bbc")
        pairs = [headline_and_opening(text) for text in pool.texts]
        return pd.DataFrame({"text": [o for _, o in pairs if o], "answer": [h for h, o in pairs if o]})
    if name not in DEMO_TASKS:
        raise DivMergeError(
            f"Unknown generative demo task {name!r}; use one of: {', '.join(GENERATIVE_TASKS)}."
        )
    _, pool = demo_split(name)
    words = answer_words(pool.label_names)
    return pd.DataFrame({"text": list(pool.texts), "answer": [words[label] for label in pool.labels]})
