"""Generative demo tasks: the demo's labelled text as prompts with answers, for causal-LM experts.

A generative task (``kind: generative``) with ``source: zoo:<task>`` reads the same held-out pool as the
classification demo task, as a table with two columns: ``text`` (the input) and ``answer`` (the label as
a word, e.g. ``positive``), so ``prompt_template`` and ``answer_column: answer`` work as on a data file.
``zoo:bbc_headline`` is free-text generation: ``text`` is a BBC article's opening paragraph and
``answer`` its headline (each article file's first line), scored with a text metric (ROUGE-L, chrF).

A third column, ``prompt``, is the question the demo's generative experts were fine-tuned on (the text's
first :data:`PROMPT_WORDS` words, then the task's question): ``prompt_template: "{prompt}"`` asks a
``zoo:smollm2/<task>`` expert exactly what it learned to answer.
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

PROMPT_WORDS = 40
"""Words of the input kept in the ``prompt`` column: short prompts keep a causal-LM step cheap."""

_QUESTIONS = {
    "rt": "Is this movie review positive or negative? Answer in one word.",
    "imdb": "Is this movie review positive or negative? Answer in one word.",
    "sms_spam": "Is this SMS message spam or ham? Answer in one word.",
    "trec": "Does this question ask for an abbreviation, description, entity, human, location or number? "
    "Answer in one word.",
    "bbc": "Is this news article about business, entertainment, politics, sports or tech? "
    "Answer in one word.",
    "tweet_sent": "Is this tweet negative, neutral or positive? Answer in one word.",
    HEADLINE_TASK: "Write a headline for this news article.",
}


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


def task_prompt(name: str, text: str) -> str:
    """The demo's question about ``text`` for a generative task: its first words, then the question.

    Args:
        name: A generative demo task.
        text: The input text.

    Returns:
        The prompt (before any chat template).
    """
    return " ".join(text.split()[:PROMPT_WORDS]) + "\n" + _QUESTIONS[name]


def generative_table(name: str, part: str = "pool") -> pd.DataFrame:
    """The held-out pool (or the expert-training rows) of a demo task as inputs, prompts and answers.

    Args:
        name: A demo task (answers are its label words) or ``bbc_headline``.
        part: ``pool``: rows the demo's experts never trained on; ``train``: the rows they trained on.

    Returns:
        A table with columns ``text``, ``answer`` and ``prompt``, in the part's order.

    Raises:
        DivMergeError: If ``name`` is not a generative demo task.
    """
    if name not in GENERATIVE_TASKS:
        raise DivMergeError(
            f"Unknown generative demo task {name!r}; use one of: {', '.join(GENERATIVE_TASKS)}."
        )
    rows = demo_split("bbc" if name == HEADLINE_TASK else name)[0 if part == "train" else 1]
    if name == HEADLINE_TASK:
        pairs = [headline_and_opening(text) for text in rows.texts]
        texts, answers = [o for _, o in pairs if o], [h for h, o in pairs if o]
    else:
        words = answer_words(rows.label_names)
        texts, answers = list(rows.texts), [words[label] for label in rows.labels]
    prompts = [task_prompt(name, t) for t in texts]
    return pd.DataFrame({"text": texts, "answer": answers, "prompt": prompts})
