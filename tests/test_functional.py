"""The fused merge (WeightedSum) and per-task gradient accumulation against plain autograd references."""

import pytest
import torch

import divmerge.core.merge as functional
from divmerge.core.merge import WeightedSum, accumulate_over_tasks
from divmerge.core.merged_model import MergedModel
from divmerge.families import load_experts
from divmerge.families.classification import step_loss
from divmerge.objectives import js_divergence
from tests.tiny import random_batches, randomise_coefficients


@pytest.fixture(scope="module")
def expert_set(tiny):
    return load_experts(tiny["base"], tiny["experts"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_sum_matches_autograd_reference(dtype, monkeypatch):
    monkeypatch.setattr(functional, "CHUNK", 7)  # several uneven chunks on a 5 x 9 tensor
    g = torch.Generator().manual_seed(0)
    base, tau = torch.randn(5, 9, generator=g), torch.randn(3, 5, 9, generator=g).to(dtype)
    coef = torch.tensor([0.3, -0.2, 0.7], requires_grad=True)
    out = WeightedSum.apply(coef, base, tau)
    weight = torch.randn(5, 9, generator=g)
    (grad,) = torch.autograd.grad((out * weight).sum(), coef)

    ref_coef = coef.detach().clone().requires_grad_()
    ref = base + torch.tensordot(ref_coef, tau.float(), dims=1)
    (ref_grad,) = torch.autograd.grad((ref * weight).sum(), ref_coef)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_merge_saves_only_the_stored_task_vectors_for_backward(expert_set):
    merged = MergedModel(expert_set, task_vector_dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        merged.merged_params()
    assert saved and all(t.dtype == torch.bfloat16 for t in saved)  # no float32 copy kept for backward
    stored = {t.data_ptr() for _, t in merged.task_vectors.items()}
    assert all(t.data_ptr() in stored for t in saved)  # the stored tensors themselves, not copies


def test_per_task_pass_equals_joint_pass(tiny, expert_set):
    batches, teachers = random_batches()
    results = {}
    for mode in ("joint", "per_task"):
        merged = MergedModel(expert_set)
        randomise_coefficients(merged)
        loss, per_task = step_loss(
            merged,
            merged.merged_params(),
            batches,
            lambda t, student: js_divergence(teachers[t], student).mean(),
            backbone_pass=mode,
        )
        loss.backward()
        results[mode] = (loss.detach(), per_task, merged.coefficients.weight.grad.clone())
    (la, pa, ga), (lb, pb, gb) = results["joint"], results["per_task"]
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(pa[1], pb[1])
    assert ga.abs().sum() > 0
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-4)


def test_accumulate_skips_tensors_no_loss_uses():
    coef = torch.tensor([1.0, 2.0], requires_grad=True)
    params = {"a": coef * 3.0, "b": coef * 5.0}
    loss, values = accumulate_over_tasks(params, {0: lambda p: p["a"].square().sum()})
    loss.backward()
    assert float(loss) == pytest.approx(float(values[0])) == pytest.approx(9.0 + 36.0)
    torch.testing.assert_close(coef.grad, torch.tensor([18.0, 36.0]))  # d/dc sum (3c)^2 = 18c
