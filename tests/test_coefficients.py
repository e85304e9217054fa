import pytest
import torch

from divmerge.core.coefficients import MergeCoefficients, get_space
from divmerge.core.coefficients.base import is_embedding
from divmerge.core.coefficients.row import RowWeightedSum
from divmerge.errors import DivMergeError

SHAPES = {
    "embeddings.word_embeddings.weight": (50, 4),
    "encoder.layer.0.attention.self.query.weight": (4, 4),
    "encoder.layer.0.output.dense.bias": (4,),
    "encoder.layer.1.attention.self.query.weight": (3, 4),
    "pooler.dense.weight": (4, 4),
}
NAMES = list(SHAPES)


def starts(granularity, **options):
    layout = get_space(granularity, options).layout({n: torch.Size(s) for n, s in SHAPES.items()})
    return [(c.start, c.stop - c.start) for c in layout.columns.values()], layout.labels


def test_columns_per_granularity():
    assert starts("task")[0] == [(0, 1)] * 5
    assert starts("layer")[0] == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]
    assert starts("block")[0] == [(0, 1), (1, 1), (1, 1), (2, 1), (3, 1)]
    # row: a matrix reads one column per row; the embedding and the bias one column each
    assert starts("row")[0] == [(0, 1), (1, 4), (5, 1), (6, 3), (9, 4)]
    # svd: a matrix reads one column per kept singular direction
    assert starts("svd")[0] == [(0, 1), (1, 4), (5, 1), (6, 3), (9, 4)]
    assert starts("svd", rank=2)[0] == [(0, 1), (1, 2), (3, 1), (4, 2), (6, 2)]
    _, labels = starts("row")
    assert len(labels) == 13 and labels[1] == f"{NAMES[1]}[0]" and labels[5] == NAMES[2]


def test_unknown_spaces_and_options_are_refused():
    with pytest.raises(DivMergeError, match=r"Unknown granularity 'rows'.*'row', 'svd'"):
        get_space("rows")
    with pytest.raises(DivMergeError, match="does not take space_options \\['rank'\\]"):
        get_space("layer", {"rank": 2})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(DivMergeError, match="rank"):
            get_space("svd", {"rank": bad})
    with pytest.raises(DivMergeError, match=r"above the rank 3 of 'encoder.layer.1.*give a rank from 1 to 3"):
        starts("svd", rank=4)


def test_embeddings_are_recognised():
    for name in ("embeddings.word_embeddings.weight", "model.embed_tokens.weight", "lm_head.weight", "wte"):
        assert is_embedding(name), name
    for name in ("encoder.layer.0.attention.self.query.weight", "model.layers.0.mlp.up_proj.weight"):
        assert not is_embedding(name), name


@pytest.mark.parametrize(("granularity", "columns"), [("task", 1), ("layer", 5), ("block", 4), ("row", 13)])
def test_shape_and_default_init(granularity, columns):
    c = MergeCoefficients(4, SHAPES, granularity)
    assert c().shape == (4, columns)
    assert torch.all(c() == 0.25)
    assert [n for n, p in c.named_parameters()] == ["weight"]


def test_group_labels():
    assert MergeCoefficients(2, SHAPES, "task").group_labels() == ["all"]
    assert MergeCoefficients(2, SHAPES, "layer").group_labels() == NAMES
    labels = MergeCoefficients(2, SHAPES, "block").group_labels()
    assert labels == [NAMES[0], "block 0", "block 1", NAMES[4]]


def test_column_refuses_a_tensor_with_several_coefficients():
    c = MergeCoefficients(2, SHAPES, "row")
    assert c.columns(c(), NAMES[1]).shape == (2, 4)
    assert c.column(c(), NAMES[2]).shape == (2,)
    with pytest.raises(DivMergeError, match="4 coefficients per task"):
        c.column(c(), NAMES[1])


def test_init_and_clamp():
    c = MergeCoefficients(2, SHAPES, "layer", init=2.0, clamp=(0.0, 1.0))
    assert torch.all(c.weight == 2.0) and torch.all(c() == 1.0)
    c().sum().backward()
    assert torch.all(c.weight.grad == 0)  # clamped from above: no gradient pushes it further
    with pytest.raises(DivMergeError, match="clamp"):
        MergeCoefficients(2, SHAPES, clamp=(1.0, 0.0))
    with pytest.raises(DivMergeError, match="at least one expert"):
        MergeCoefficients(0, SHAPES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_sum_and_gradient_match_autograd(dtype, monkeypatch):
    monkeypatch.setattr("divmerge.core.coefficients.row.ROW_CHUNK", 7)  # several chunks in bf16
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(3, 5, 4, generator=g).to(dtype)  # (T, R, N)
    base = torch.randn(5, 4, generator=g)
    coef = torch.randn(3, 5, generator=g, requires_grad=True)
    ref_coef = coef.detach().clone().requires_grad_(True)
    weights = torch.randn(5, 4, generator=g)
    (RowWeightedSum.apply(coef, base, tau) * weights).sum().backward()
    ref = base + (ref_coef[:, :, None] * tau.float()).sum(0)
    (ref * weights).sum().backward()
    torch.testing.assert_close(RowWeightedSum.apply(coef, base, tau), ref)
    torch.testing.assert_close(coef.grad, ref_coef.grad)


def test_svd_storage_merge_and_gradient():
    g = torch.Generator().manual_seed(1)
    space = get_space("svd", {"rank": 2})
    tau = torch.randn(3, 5, 4, generator=g)  # (T, R, N)
    base = torch.randn(5, 4, generator=g)
    us, vh = space.store("encoder.layer.0.attention.self.query.weight", tau)
    assert us.shape == (3, 5, 2) and vh.shape == (3, 2, 4)
    coef = torch.rand(3, 2, generator=g, requires_grad=True)
    merged = space.merge(coef, base, (us, vh))
    u, s, v = torch.linalg.svd(tau)
    want = base + sum(u[t, :, :2] @ torch.diag(coef[t] * s[t, :2]) @ v[t, :2] for t in range(3))
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-5)
    merged.sum().backward()
    assert coef.grad is not None and coef.grad.shape == (3, 2) and coef.grad.abs().sum() > 0
    # 1-D tensors and embeddings are kept whole, with one coefficient per task
    assert space.store("encoder.layer.0.output.dense.bias", tau[:, 0]) is not None
    assert isinstance(space.store("embeddings.word_embeddings.weight", tau), torch.Tensor)
