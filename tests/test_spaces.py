"""The per-tensor coefficient spaces (row, svd) on a tiny BERT pair: exactness, storage, refusals, CLI."""

import json
from pathlib import Path

import pytest
import torch

import train
from divmerge.core.merged_model import MergedModel
from divmerge.errors import DivMergeError
from divmerge.families import load_experts
from divmerge.families.classification import task_logits
from tests.test_cli import coefficients, expect_error, write_config
from tests.test_lora import make_lora_expert

MATRIX = "encoder.layer.1.output.dense.weight"


@pytest.fixture(scope="module")
def expert_set(tiny):
    return load_experts(tiny["base"], tiny["experts"])


def logits(merged, task, table):
    ids = torch.randint(1000, 2000, (3, 7), generator=torch.Generator().manual_seed(0))
    params = merged.merged_params(table)
    return task_logits(merged, task, params, input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize(("granularity", "options"), [("row", None), ("svd", None)])
def test_one_hot_coefficients_reproduce_each_expert(expert_set, granularity, options):
    merged = MergedModel(expert_set, granularity, space_options=options)
    layer = MergedModel(expert_set, "layer")
    for task in range(2):
        got = logits(merged, task, merged.one_hot_table(task))
        want = logits(layer, task, layer.one_hot_table(task))
        assert (got - want).abs().max() < 1e-4


def test_row_coefficients_scale_each_row(expert_set):
    merged = MergedModel(expert_set, "row")
    with torch.no_grad():
        merged.coefficients.weight.uniform_(-1, 2, generator=torch.Generator().manual_seed(3))
    c = merged.coefficients.columns(merged.coefficients.weight, MATRIX)  # (T, R)
    tau = expert_set.task_vectors[MATRIX]  # (T, R, N)
    want = expert_set.base[MATRIX] + c[0, :, None] * tau[0] + c[1, :, None] * tau[1]
    torch.testing.assert_close(merged.merged_params()[f"bert.{MATRIX}"], want)
    logits(merged, 1, None).sum().backward()
    grad = merged.coefficients.columns(merged.coefficients.weight.grad, MATRIX)
    assert grad.shape == c.shape and (grad != 0).float().mean() > 0.5  # rows move separately


def test_svd_rank_stores_less_and_static_merges_see_rank_r(expert_set):
    full = MergedModel(expert_set, "layer")
    low = MergedModel(expert_set, "svd", space_options={"rank": 2})
    assert low.task_vectors.numel() < full.task_vectors.numel()
    dense = low.dense_task_vectors()[MATRIX]  # (T, R, N), rank 2 per task
    assert dense.shape == expert_set.task_vectors[MATRIX].shape
    assert all(torch.linalg.matrix_rank(dense[t]) == 2 for t in range(2))
    # at 1/T everywhere, the svd merge is the mean of the rank-2 task vectors (layer-wise at 1/T, truncated)
    merged = low.merged_params()[f"bert.{MATRIX}"]
    torch.testing.assert_close(merged, expert_set.base[MATRIX] + dense.mean(0), atol=1e-5, rtol=1e-5)


def test_per_tensor_spaces_refuse_lora_experts_and_sharding(tmp_path, tiny, expert_set):
    adapter = make_lora_expert(Path(tiny["base"]), tmp_path / "beta_lora", 3, seed=7)
    with_lora = load_experts(tiny["base"], {"alpha": tiny["experts"]["alpha"], "beta": str(adapter)})
    for granularity in ("row", "svd"):
        with pytest.raises(DivMergeError, match=r"needs fully fine-tuned experts.*task, layer or block"):
            MergedModel(with_lora, granularity)
        with pytest.raises(DivMergeError, match="does not run sharded"):
            MergedModel(expert_set, granularity).shard(None)


def test_fit_test_and_resume_guard_with_svd(tmp_path, tiny, capsys):
    config = write_config(tmp_path, tiny, epochs=1)
    args = ["--model.granularity", "svd", "--model.space_options", "{rank: 2}"]
    train.main(["fit", "--config", config, *args])
    ckpt = tmp_path / "run" / "ckpt" / "last.ckpt"
    table = coefficients(ckpt)
    assert table.shape[0] == 2 and table.shape[1] > 20 and (table != 0.5).any()
    assert ckpt.stat().st_size < 200_000  # the coefficients alone
    labels = json.loads(next((tmp_path / "run").rglob("coefficients.json")).read_text())["groups"]
    assert len(labels) == table.shape[1] and any("@s1" in label for label in labels)
    train.main(["test", "--config", config, *args, "--ckpt_path", str(ckpt)])
    assert "| ANP" in capsys.readouterr().out
    bad = ["--model.granularity", "svd", "--model.space_options", "{rank: 1}", "--ckpt_path", str(ckpt)]
    expect_error(capsys, ["test", "--config", config, *bad], "space_options {'rank': 2} but the config asks")
    expect_error(
        capsys,
        ["fit", "--config", config, "--model.granularity", "svd", "--model.space_options", "{rank: 0}"],
        "space_options.rank is 0",
    )
    expect_error(
        capsys,
        ["fit", "--config", config, "--model.granularity", "row", "--model.space_options", "{rank: 2}"],
        "does not take space_options",
    )


def test_teachers_of_a_truncated_svd_space_are_the_experts_themselves(tmp_path, tiny):
    from divmerge.data import TaskSpec
    from divmerge.engine import Merger
    from divmerge.lightning.datamodule import MergeDataModule

    specs = [
        TaskSpec(name=n, source=p, num_unlabelled=8, num_val=0, num_test=8) for n, p in tiny["data"].items()
    ]
    dm = MergeDataModule(specs, tokenizer=tiny["base"], max_length=16)
    teachers = {}
    for granularity, options in (("layer", None), ("svd", {"rank": 1})):
        merger = Merger(tiny["base"], tiny["experts"], granularity=granularity, space_options=options)
        merger.check_data(dm)
        teachers[granularity] = merger.compute_teacher(dm, "beta", "unlabelled", torch.device("cpu"))
        merged = merger.build()
    assert not merged.coefficients.space.exact
    torch.testing.assert_close(teachers["svd"], teachers["layer"])
    # while the rank-1 model's own one-hot merge is not the expert
    ids = torch.randint(1000, 2000, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = {"attention_mask": torch.ones_like(ids)}
    lossy = task_logits(merged, 1, merged.merged_params(merged.one_hot_table(1)), input_ids=ids, **mask)
    layer = MergedModel(merger.expert_set, "layer")
    exact = task_logits(layer, 1, layer.merged_params(layer.one_hot_table(1)), input_ids=ids, **mask)
    assert (lossy - exact).abs().max() > 1e-3


def test_svd_releases_the_dense_task_vectors_after_its_teachers(tiny):
    import gc
    import weakref

    from divmerge.engine import Merger

    layer = Merger(tiny["base"], tiny["experts"])
    layer.release_expert_set()
    assert not layer.holds_two_copies and layer.expert_set is not None  # one copy, shared: kept
    merger = Merger(tiny["base"], tiny["experts"], granularity="svd", space_options={"rank": 2})
    merger.build()
    assert merger.holds_two_copies
    dense = weakref.ref(merger.expert_set.task_vectors[MATRIX])
    merger.release_expert_set()
    gc.collect()
    assert merger.expert_set is None and dense() is None  # the dense stacks are freed
    assert merger.build().task_vectors[MATRIX][0].shape[-1] == 2  # the rank-2 factors stay
    with pytest.raises(DivMergeError, match="released its expert set"):
        merger.subset(["alpha"])
