import math

import pytest
import torch

from divmerge.errors import DivMergeError
from divmerge.objectives import LN2, entropy, get_objective, js_divergence, kl_divergence


def logits(*shape, scale=3.0, seed=0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference_js(p_logits, q_logits):
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)


def test_js_matches_float64_reference():
    a, b = logits(64, 7, seed=1), logits(64, 7, seed=2)
    got = js_divergence(torch.log_softmax(a, -1), b)
    assert got.shape == (64,)
    torch.testing.assert_close(got.double(), reference_js(a, b), atol=1e-6, rtol=1e-5)


def test_js_symmetric_and_zero_on_identical():
    a, b = logits(32, 5, seed=3), logits(32, 5, seed=4)
    ab = js_divergence(torch.log_softmax(a, -1), b)
    ba = js_divergence(torch.log_softmax(b, -1), a)
    torch.testing.assert_close(ab, ba, atol=1e-6, rtol=1e-6)
    assert (ab > 1e-4).all()
    assert js_divergence(torch.log_softmax(a, -1), a).abs().max() < 1e-6


def test_js_bounded_by_ln2_and_stable_at_disjoint_supports():
    a = torch.tensor([[1e4, -1e4], [0.0, 0.0]])
    b = torch.tensor([[-1e4, 1e4], [0.0, 0.0]])
    got = js_divergence(torch.log_softmax(a, -1), b)
    assert torch.isfinite(got).all()
    assert abs(got[0].item() - LN2) < 1e-5
    many = js_divergence(
        torch.log_softmax(logits(512, 4, scale=20, seed=5), -1), logits(512, 4, scale=20, seed=6)
    )
    assert (many <= LN2 + 1e-6).all() and (many >= 0).all()


def test_js_has_gradient_everywhere():
    b = logits(8, 3, seed=7).requires_grad_()
    js_divergence(torch.log_softmax(logits(8, 3, seed=8), -1), b).sum().backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_kl_non_negative_matches_reference_and_zero_on_identical():
    a, b = logits(64, 6, seed=9), logits(64, 6, seed=10)
    got = kl_divergence(torch.log_softmax(a, -1), b)
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    torch.testing.assert_close(got.double(), (p * (p / q).log()).sum(-1), atol=1e-5, rtol=1e-5)
    assert (got >= 0).all()
    assert kl_divergence(torch.log_softmax(a, -1), a).abs().max() < 1e-6


def test_kl_is_not_symmetric():
    a, b = logits(16, 4, seed=11), logits(16, 4, seed=12)
    ab = kl_divergence(torch.log_softmax(a, -1), b)
    ba = kl_divergence(torch.log_softmax(b, -1), a)
    assert not torch.allclose(ab, ba)


def test_entropy_bounds():
    uniform = torch.zeros(3, 5)
    torch.testing.assert_close(entropy(uniform, uniform), torch.full((3,), math.log(5)))
    peaked = torch.tensor([[100.0, 0.0, 0.0]])
    assert entropy(peaked, peaked).item() < 1e-6


def test_unknown_objective_lists_valid_names():
    with pytest.raises(DivMergeError, match=r"entropy.*js.*kl"):
        get_objective("hellinger")
