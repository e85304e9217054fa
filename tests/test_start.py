"""Learned coefficients that start from a static merge (``start_from``): step 0 is the static merge."""

import pytest
import torch

import train
from divmerge.engine import Merger
from divmerge.errors import DivMergeError
from divmerge.families import load_experts
from divmerge.lightning.module import DivMergeModule
from tests.test_cli import coefficients, expect_error, write_config
from tests.test_spaces import MATRIX, logits


@pytest.fixture(scope="module")
def expert_set(tiny):
    return load_experts(tiny["base"], tiny["experts"])


@pytest.mark.parametrize("granularity", ["layer", "row", "svd"])
def test_step_zero_is_the_static_merge_and_experts_stay_exact(expert_set, granularity):
    merger = Merger.from_expert_set(expert_set, granularity=granularity, start_from="tsv_m")
    merged = merger.build()
    assert (merged.coefficients.weight == 0).all()  # init defaults to 0 with a start
    learned, tsv = merger.learned_params(), merger.static_params("tsv_m")
    assert learned.keys() == tsv.keys()
    for name, tensor in tsv.items():
        torch.testing.assert_close(learned[name], tensor)
    assert not torch.allclose(
        tsv[f"bert.{MATRIX}"], merger.static_params("task_arithmetic")[f"bert.{MATRIX}"]
    )
    # explicit tables still merge around theta_0: one-hot is the expert, zeros the base
    plain = Merger.from_expert_set(expert_set, granularity=granularity).build()
    for task in range(2):
        want = logits(plain, task, plain.one_hot_table(task))
        assert (logits(merged, task, merged.one_hot_table(task)) - want).abs().max() < 1e-5
    torch.testing.assert_close(
        merged.merged_params(merged.base_table()), plain.merged_params(plain.base_table())
    )


def test_learned_coefficients_move_the_merge_away_from_the_start(expert_set):
    merger = Merger.from_expert_set(
        expert_set, granularity="layer", start_from="ties", start_options={"density": 0.5}
    )
    merged = merger.build()
    with torch.no_grad():
        merged.coefficients.weight.fill_(0.25)
    got = merger.learned_params()[f"bert.{MATRIX}"]
    start = merger.static_params("ties", {"density": 0.5})[f"bert.{MATRIX}"]
    torch.testing.assert_close(got, start + 0.25 * expert_set.task_vectors[MATRIX].sum(0))
    logits(merged, 0, None).sum().backward()  # gradients reach the coefficients through the start
    assert merged.coefficients.weight.grad.abs().sum() > 0
    assert merger.describe("divmerge") == "layer-wise js merge from ties"


def test_bad_starts_are_refused_in_one_line(tiny):
    with pytest.raises(DivMergeError, match=r"start_from: Unknown merge method 'tsv'.*tsv_m"):
        Merger(tiny["base"], tiny["experts"], start_from="tsv")
    with pytest.raises(DivMergeError, match="start_from: Unknown merge method 'divmerge'"):
        Merger(tiny["base"], tiny["experts"], start_from="divmerge")  # a learned merge is no start
    with pytest.raises(DivMergeError, match=r"start_from.*rank_fraction"):
        Merger(tiny["base"], tiny["experts"], start_from="tsv_m", start_options={"rank_fraction": 2.0})
    with pytest.raises(DivMergeError, match="start_options are set without start_from"):
        Merger(tiny["base"], tiny["experts"], start_options={"density": 0.2})
    with pytest.raises(DivMergeError, match="start_from applies to learned merges"):
        DivMergeModule(tiny["experts"], tiny["base"], method="ties", start_from="tsv_m")


def test_fit_from_a_start_and_the_resume_guard(tmp_path, tiny, capsys):
    config = write_config(tmp_path, tiny, epochs=1)
    start = ["--model.granularity", "row", "--model.start_from", "tsv_m"]
    train.main(["fit", "--config", config, *start])
    ckpt = tmp_path / "run" / "ckpt" / "last.ckpt"
    table = coefficients(ckpt)
    assert (table != 0).any() and table.abs().max() < 1.0  # trained from 0
    train.main(["test", "--config", config, *start, "--ckpt_path", str(ckpt)])
    assert "row-wise js merge from tsv_m" in capsys.readouterr().out
    for other in (["--model.start_from", "ties"], ["--model.start_options", "{rank_fraction: 0.25}"]):
        expect_error(
            capsys,
            ["test", "--config", config, *start, *other, "--ckpt_path", str(ckpt)],
            "The checkpoint's coefficients start from",
        )
    expect_error(
        capsys,
        ["test", "--config", config, "--model.granularity", "row", "--ckpt_path", str(ckpt)],
        "The checkpoint's coefficients start from {'from': 'tsv_m'",
    )
