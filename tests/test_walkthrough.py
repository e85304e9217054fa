"""The guide's "Merge your own experts in five minutes" (docs/guides/own-experts.md), executed as written.

The test plays the user: it makes small MiniLM experts (with real class names in their config.json) and
pre-split jsonl files with string labels at the guide's paths, writes the guide's YAML, runs the
guide's two commands (``python`` is this interpreter, ``train.py`` the repository's) and checks what
they print: the table, the sizes and class names divmerge chose, the training length, and no noise.
"""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from divmerge.zoo import base_model_path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "own-experts.md"
HEADING = "## Merge your own experts in five minutes"
TASKS = {  # task -> (class names, rows per split file)
    "sentiment": (["negative", "positive"], {"train": 40, "val": 12, "test": 20}),
    "topic": (["world", "sports", "business", "tech"], {"train": 24, "test": 16}),
}
NOISE = ("LightningCLI's args parameter", "Tip:", "LeafSpec", "Test metric", "Traceback", "Warning")


def walkthrough() -> tuple[str, list[str]]:
    """The walkthrough's YAML block and the commands of its bash block."""
    text = GUIDE.read_text()
    start = text.index(HEADING)
    section = text[start : text.index("\n## ", start + len(HEADING))]
    yaml_block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    bash_block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return yaml_block, [line for line in bash_block.splitlines() if line.strip()]


def make_expert(path: Path, names: list[str], seed: int) -> None:
    """A MiniLM classifier with a random head and slightly moved weights, saved like a user's expert."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(
        base_model_path(),
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base_model_path()).save_pretrained(path)


def write_jsonl(path: Path, names: list[str], rows: int, seed: int) -> None:
    rng = random.Random(seed)
    words = ["good", "bad", "film", "match", "vote", "market", "phone", "great", "awful", "news"]
    lines = [
        json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(3, 10))), "label": rng.choice(names)})
        for _ in range(rows)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    assert command.startswith("python train.py "), command
    args = [sys.executable, str(ROOT / "train.py"), *command.split()[2:]]
    env = {**os.environ, "DIVMERGE_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "2"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def table_rows(out: str) -> dict[str, list[str]]:
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")
    ]
    return {r[0]: r[1:] for r in rows}


@pytest.mark.e2e
def test_guide_walkthrough_runs_as_written(tmp_path):
    yaml_block, commands = walkthrough()
    config_path = yaml_block.splitlines()[0].removeprefix("# ").strip()
    assert config_path == "my_merge/merge.yaml" and len(commands) == 2
    for seed, (task, (names, files)) in enumerate(TASKS.items()):
        make_expert(tmp_path / "my_merge" / "experts" / task, names, seed)
        for split, rows in files.items():
            write_jsonl(tmp_path / "my_merge" / "data" / task / f"{split}.jsonl", names, rows, seed)
    (tmp_path / config_path).write_text(yaml_block)

    fit = run(commands[0], tmp_path)
    for noise in NOISE:
        assert noise not in fit.stdout + fit.stderr, noise
    err = fit.stderr
    assert (
        "task 'sentiment': unlabelled all 40 rows of my_merge/data/sentiment/train.jsonl; val all 12 rows of "
        "my_merge/data/sentiment/val.jsonl; test all 20 rows of my_merge/data/sentiment/test.jsonl" in err
    ), err
    assert "class names from my_merge/experts/sentiment/config.json (id2label) (2 classes)" in err
    assert "class names from my_merge/experts/topic/config.json (id2label) (4 classes)" in err
    assert "trainer.max_epochs is not set: training 13 epochs of 10 steps (130 steps)" in err
    assert re.search(
        r"divmerge: step 10/130 \| epoch 1/13 \| loss [\d.]+ \| val ANP [\d.]+ \| .* ETA ", fit.stdout
    )
    table = table_rows(fit.stdout)
    assert table["sentiment"][0] == "20" and table["topic"][0] == "16", fit.stdout  # the whole test files
    assert "ANP" in table and "| expert building |" not in fit.stdout  # no demo experts were built

    test = run(commands[1], tmp_path)
    for noise in NOISE:
        assert noise not in test.stdout + test.stderr, noise
    again = table_rows(test.stdout)
    assert again["sentiment"] == table["sentiment"] and again["ANP"] == table["ANP"]
