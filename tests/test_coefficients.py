import pytest
import torch

from divmerge.core.coefficients import MergeCoefficients, group_tensors
from divmerge.errors import DivMergeError

NAMES = [
    "embeddings.word_embeddings.weight",
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.output.dense.bias",
    "encoder.layer.1.attention.self.query.weight",
    "pooler.dense.weight",
]


def test_groups_per_granularity():
    assert group_tensors(NAMES, "task") == [0, 0, 0, 0, 0]
    assert group_tensors(NAMES, "layer") == [0, 1, 2, 3, 4]
    assert group_tensors(NAMES, "block") == [0, 1, 1, 2, 3]
    with pytest.raises(DivMergeError, match="granularity"):
        group_tensors(NAMES, "row")


@pytest.mark.parametrize(("granularity", "columns"), [("task", 1), ("layer", 5), ("block", 4)])
def test_shape_and_default_init(granularity, columns):
    c = MergeCoefficients(4, NAMES, granularity)
    assert c().shape == (4, columns)
    assert torch.all(c() == 0.25)
    assert [n for n, p in c.named_parameters()] == ["weight"]


def test_group_labels():
    assert MergeCoefficients(2, NAMES, "task").group_labels() == ["all"]
    assert MergeCoefficients(2, NAMES, "layer").group_labels() == NAMES
    labels = MergeCoefficients(2, NAMES, "block").group_labels()
    assert labels == [NAMES[0], "block 0", "block 1", NAMES[4]]


def test_init_and_clamp():
    c = MergeCoefficients(2, NAMES, "layer", init=2.0, clamp=(0.0, 1.0))
    assert torch.all(c.weight == 2.0) and torch.all(c() == 1.0)
    c().sum().backward()
    assert torch.all(c.weight.grad == 0)  # clamped from above: no gradient pushes it further
    with pytest.raises(DivMergeError, match="clamp"):
        MergeCoefficients(2, NAMES, clamp=(1.0, 0.0))
    with pytest.raises(DivMergeError, match="at least one expert"):
        MergeCoefficients(0, NAMES)
