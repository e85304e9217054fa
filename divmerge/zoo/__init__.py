"""The offline demo: tasks and experts built from data and a base model shipped inside PyPI packages.

A plugin on top of divmerge: importing it registers the ``zoo:`` scheme for model sources
(``zoo:minilm``, ``zoo:smollm2``, ``zoo:<task>``, ``zoo:lora/<task>``, and the generative SmolLM2
experts ``zoo:smollm2/<task>``, ``zoo:smollm2/lora/<task>``) and for task data (``zoo:<task>``;
generative tasks get prompts' inputs and answer words, and ``zoo:bbc_headline``).
"""

from pathlib import Path

import pandas as pd

from divmerge.data import Rows, register_data_scheme
from divmerge.errors import DivMergeError
from divmerge.experts.sources import default_cache_dir, register_scheme
from divmerge.zoo.demo import (
    DEMO_TASKS,
    EXPERT_META_FILE,
    EXTRA_TASKS,
    LORA_PREFIX,
    LORA_RECIPE,
    MORE_TASKS,
    ZOO_PREFIX,
    ExpertRecipe,
    LabelledTexts,
    base_model_path,
    build_expert,
    demo_expert,
    demo_split,
    expert_dir,
    load_demo_task,
)
from divmerge.zoo.gen_experts import (
    GEN_LORA_RECIPE,
    GEN_PREFIX,
    GEN_RECIPE,
    build_gen_expert,
    gen_expert,
    gen_expert_dir,
)
from divmerge.zoo.gen_tasks import GENERATIVE_TASKS, HEADLINE_TASK, answer_words, generative_table
from divmerge.zoo.smollm2 import SMOLLM2_NAME, smollm2_gguf_file, smollm2_path


def resolve_model(name: str, build: bool = False) -> str:
    """``zoo:<name>`` as a local path: a packaged base (``minilm``, ``smollm2``) or a demo expert.

    Args:
        name: ``minilm``, ``smollm2`` (converted from its GGUF file on first use), ``<task>``,
            ``lora/<task>``, or a generative SmolLM2 expert ``smollm2/<task>`` / ``smollm2/lora/<task>``.
        build: Fine-tune the demo expert if it is not cached yet.

    Returns:
        The model directory.
    """
    if name == "minilm":
        return str(base_model_path())
    if name == SMOLLM2_NAME:
        return str(smollm2_path())
    if name.startswith(GEN_PREFIX):
        task, recipe = gen_expert(name[len(GEN_PREFIX) :])
        if build:
            return str(build_gen_expert(task, recipe))
        path = gen_expert_dir(task, recipe, default_cache_dir(), smollm2_path())
        if not (path / EXPERT_META_FILE).is_file():
            raise DivMergeError(
                f"Demo expert {ZOO_PREFIX + name!r} is not built yet: run `python train.py fit` once (its "
                "prepare_data step builds it) or call divmerge.zoo.build_gen_expert."
            )
        return str(path)
    task, recipe = demo_expert(name)
    load_demo_task(task)  # unknown names fail here with the list of valid ones
    path = build_expert(task, recipe) if build else expert_dir(task, recipe)
    if not Path(path).is_dir():
        raise DivMergeError(
            f"Demo expert {ZOO_PREFIX + name!r} is not built yet: run `python train.py fit` once (its "
            "prepare_data step builds it) or call divmerge.zoo.build_expert."
        )
    return str(path)


def read_task(name: str, kind: str = "classification") -> Rows | pd.DataFrame:
    """``zoo:<task>`` data: the demo task's held-out pool (rows the experts never trained on).

    Args:
        name: A demo task, or (generative only) ``bbc_headline``.
        kind: The task's kind: ``classification`` gets labelled rows, ``generative`` a table with the
            columns ``text`` and ``answer`` (see :mod:`divmerge.zoo.gen_tasks`).

    Returns:
        The rows, or the table.
    """
    if kind == "generative":
        return generative_table(name)
    if name == HEADLINE_TASK:
        raise DivMergeError(
            f"Demo task {ZOO_PREFIX + name!r} is free-text generation: set kind: generative on the task "
            '(e.g. prompt_template: "{text}\\nHeadline:", answer_column: answer).'
        )
    _, pool = demo_split(name)
    return Rows(list(pool.texts), list(pool.labels), tuple(pool.label_names))


register_scheme(ZOO_PREFIX, resolve_model)
register_data_scheme(ZOO_PREFIX, read_task)

__all__ = [
    "DEMO_TASKS",
    "EXPERT_META_FILE",
    "EXTRA_TASKS",
    "GENERATIVE_TASKS",
    "GEN_LORA_RECIPE",
    "GEN_PREFIX",
    "GEN_RECIPE",
    "HEADLINE_TASK",
    "LORA_PREFIX",
    "LORA_RECIPE",
    "MORE_TASKS",
    "SMOLLM2_NAME",
    "ZOO_PREFIX",
    "ExpertRecipe",
    "LabelledTexts",
    "answer_words",
    "base_model_path",
    "build_expert",
    "build_gen_expert",
    "default_cache_dir",
    "demo_expert",
    "demo_split",
    "expert_dir",
    "gen_expert",
    "gen_expert_dir",
    "generative_table",
    "load_demo_task",
    "read_task",
    "resolve_model",
    "smollm2_gguf_file",
    "smollm2_path",
]
