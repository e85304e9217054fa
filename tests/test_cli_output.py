"""What a run prints: plain progress with an ETA when output is a file, chosen defaults said once, no
library noise, expert building as its own phase, every task key in --help, one learning rate."""

import dataclasses
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import train
from benchmarks import merge_quality
from divmerge.data import TaskSpec
from divmerge.engine import DEFAULT_LR
from divmerge.experts.sources import register_scheme
from divmerge.lightning import cli as cli_module
from divmerge.lightning.module import DivMergeModule
from divmerge.lightning.progress import duration
from divmerge.phases import EXPERT_PHASE, timed
from tests.test_cli import write_config

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("LightningCLI's args parameter", "Tip:", "LeafSpec", "Test metric", "No seed found", "Warning")


def without_length(config: str) -> str:
    """The config with no training length and no progress-bar setting (as a newcomer writes it)."""
    cfg = yaml.safe_load(Path(config).read_text())
    del cfg["trainer"]["max_epochs"], cfg["trainer"]["enable_progress_bar"]
    Path(config).write_text(yaml.safe_dump(cfg))
    return config


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_output_to_a_file_is_plain_progress_without_noise(tmp_path, tiny):
    config = without_length(write_config(tmp_path, tiny))
    fit = run("fit", "--config", config)
    for noise in NOISE:
        assert noise not in fit.stdout + fit.stderr, (noise, fit.stdout + fit.stderr)
    # 12 unlabelled inputs per task, 4 per step: 3 steps per epoch, so 43 epochs reach 128 steps.
    assert "divmerge: trainer.max_epochs is not set: training 43 epochs of 3 steps (129 steps)" in fit.stderr
    lines = [line for line in fit.stdout.splitlines() if line.startswith("divmerge: step ")]
    assert len(lines) == 43 and lines[-1].startswith("divmerge: step 129/129 | epoch 43/43 | loss ")
    assert all(re.search(r"val ANP [\d.]+ \| [\d.]+ steps/s \| ETA \d+", line) for line in lines), lines[:3]
    assert "\r" not in fit.stdout + fit.stderr  # no redrawn progress bar in a file
    assert "| ANP" in fit.stdout and "Wall time per phase" in fit.stdout

    test = run("test", "--config", config, "--ckpt_path", str(tmp_path / "run" / "ckpt" / "last.ckpt"))
    for noise in NOISE:
        assert noise not in test.stdout + test.stderr, noise
    assert test.stdout.count("| ANP") == 1  # divmerge's table, not Lightning's metric tables


def test_a_set_length_is_kept_and_the_log_interval_fits_the_epoch(tmp_path, tiny, capsys):
    cli = train.main(["fit", "--config", write_config(tmp_path, tiny, epochs=2)])
    assert cli.trainer.max_epochs == 2 and cli.trainer.global_step == 6
    assert cli.trainer.log_every_n_steps == 1
    assert "max_epochs is not set" not in capsys.readouterr().err
    cli = train.main(
        ["fit", "--config", without_length(write_config(tmp_path, tiny)), "--trainer.max_steps", "5"]
    )
    assert cli.trainer.global_step == 5


def test_metrics_are_flushed_while_training(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(cli_module, "PLAIN_EVERY_S", 0.0)  # as if 30 s passed after every step
    probe = '{"class_path": "tests.tiny.MetricsProbe"}'
    cli = train.main(
        ["fit", "--config", write_config(tmp_path, tiny, epochs=3), "--trainer.callbacks+", probe]
    )
    rows = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "MetricsProbe").rows
    # Lightning's CSVLogger alone writes metrics.csv every 100 steps: nothing before the run ends here.
    assert rows[0] >= 3 and rows == sorted(rows) and rows[-1] > rows[0], rows


def test_expert_building_is_its_own_phase(tmp_path, tiny):
    def slow_build(name: str, build: bool) -> str:
        if build:
            with timed(EXPERT_PHASE):
                time.sleep(0.6)
        return tiny["experts"][name]

    register_scheme("slowbuild:", slow_build)
    experts = {name: f"slowbuild:{name}" for name in tiny["experts"]}
    cli = train.main(["fit", "--config", write_config(tmp_path, tiny, experts=experts, epochs=1)])
    phases = cli.timer.seconds
    assert list(phases)[:3] == ["start-up", "expert building", "setup"], phases
    assert 1.2 <= phases["expert building"] < 5 and phases["start-up"] >= 0, phases


def test_help_lists_every_task_key(capsys):
    with pytest.raises(SystemExit):
        train.main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    tasks_help = text[text.index("--data.tasks [ITEM") : text.index("--data.max_length MAX_LENGTH ")]
    keys = [f.name for f in dataclasses.fields(TaskSpec)]
    missing = [k for k in keys if not re.search(rf"\b{k}\b", tasks_help)]
    assert not missing, (missing, tasks_help)


def test_one_learning_rate_everywhere():
    import inspect

    assert inspect.signature(DivMergeModule).parameters["lr"].default == DEFAULT_LR == merge_quality.LR
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        assert "lr" not in (yaml.safe_load(config.read_text()).get("model") or {}), config.name


def test_lightning_tips_are_dropped_and_other_lines_kept(caplog):
    cli_module.quiet_libraries()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        logger.info("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud logging, try installing [litlogger]")
        logger.info("GPU available: False, used: False")
    assert "litlogger" not in caplog.text and "GPU available" in caplog.text


def test_durations_read_like_a_clock():
    assert [duration(s) for s in (0.4, 59, 75, 3725)] == ["0s", "59s", "1m15s", "1h02m"]


def test_the_empty_validation_loader_warning_is_dropped(recwarn):
    import warnings

    cli_module.quiet_libraries()
    warnings.warn(
        "Total length of `list` across ranks is zero. Make sure this was your intention.", stacklevel=1
    )
    warnings.warn("something the user must see", stacklevel=1)
    assert [str(w.message) for w in recwarn] == ["something the user must see"]
