"""WUDI merging (wudi): against an autograd + torch.optim.Adam reference, the paper's properties, options."""

import pytest
import torch

from benchmarks import merge_quality as mq
from divmerge.engine import Merger
from divmerge.errors import DivMergeError
from divmerge.families import load_experts
from divmerge.static import STATIC_METHODS, WUDI_ITERATIONS, WUDI_LAMBDA, WUDI_LR, check_method, static_merge
from tests.test_spaces import MATRIX, logits
from tests.test_static import make as make_tensors

SHAPES = {
    "embeddings.word_embeddings.weight": (11, 6),
    "encoder.layer.0.attention.self.query.weight": (6, 6),
    "encoder.layer.0.intermediate.dense.weight": (9, 6),
    "encoder.layer.0.output.dense.weight": (3, 20),  # 2 T m < n for T = 2, 3: the factored gradient
    "encoder.layer.0.output.dense.bias": (6,),
    "conv.weight": (2, 2, 3),
}
MATRICES = [n for n, s in SHAPES.items() if len(s) == 2]
SCALE = 1e-3  # task vectors of fine-tuning size, as the paper's (and the demo zoo's: mean |tau| ~1.5e-3)


def make(num_tasks: int = 3, seed: int = 0) -> tuple[dict, dict]:
    base, tvs = make_tensors(num_tasks, seed, SHAPES)
    return base, {n: v * SCALE for n, v in tvs.items()}


def interference(merged: torch.Tensor, tau: torch.Tensor) -> float:
    """The paper's objective, written per task in float64: sum_t ||(M - tau_t) tau_t^T||^2 / ||tau_t||^2."""
    merged, tau = merged.double(), tau.double()
    return sum(float(((merged - t) @ t.T).square().sum() / t.square().sum()) for t in tau)


def reference(tau: torch.Tensor, iterations: int, lr: float) -> torch.Tensor:
    """The authors' procedure, independently: autograd on the per-task losses, torch.optim.Adam."""
    merged = torch.nn.Parameter(tau.sum(0).clone())  # (m, n)
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    for _ in range(iterations):
        loss = sum(((merged - t) @ t.T).square().sum() / t.square().sum() for t in tau)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


# -------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize(("num_tasks", "lr", "iterations"), [(2, 1e-4, 40), (3, 3e-5, 60), (4, 1e-4, 25)])
def test_matches_autograd_adam_reference(num_tasks, lr, iterations):
    base, tvs = make(num_tasks, seed=num_tasks)
    base = {n: torch.zeros_like(v) for n, v in base.items()}  # the merged task vector itself, unrounded
    merged = static_merge("wudi", base, tvs, iterations=iterations, lr=lr, lambda_=0.7)
    for name in MATRICES:
        want = reference(tvs[name], iterations, lr)
        assert (want - tvs[name].sum(0)).abs().max() > 10 * lr  # the reference moved from the start
        torch.testing.assert_close(merged[name], 0.7 * want, rtol=0, atol=1e-8)


def test_loss_at_the_result_is_lower_than_at_the_sum():
    base, tvs = make(3, seed=5)
    merged = static_merge("wudi", base, tvs)  # the paper's defaults
    for name in MATRICES:
        start, result = tvs[name].sum(0), merged[name] - base[name]
        assert interference(result, tvs[name]) < 0.8 * interference(start, tvs[name]), name
        fewer = static_merge("wudi", base, tvs, iterations=30)[name] - base[name]
        losses = [interference(x, tvs[name]) for x in (result, fewer, start)]
        assert losses == sorted(losses) and len(set(losses)) == 3, name  # lower with more steps


# -------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_one_task_is_that_task_exactly(lam):
    # One task: the start tau is a minimum (zero loss, zero gradient), so Adam never moves it.
    base, tvs = make(1, seed=2)
    merged = static_merge("wudi", base, tvs, lr=1e-3, lambda_=lam)
    for name in MATRICES:
        assert torch.equal(merged[name], base[name] + lam * tvs[name][0]), name


def test_a_task_orthogonal_to_the_others_keeps_its_action_on_its_inputs():
    # Task 0 reads input coordinates 0..2 only, tasks 1 and 2 (which interfere) coordinates 3..7: the
    # merge acts on task 0's inputs exactly as task 0 does (M tau_0^T = tau_0 tau_0^T), and leaves those
    # columns at tau_0, while the interfering columns move.
    g = torch.Generator().manual_seed(3)
    tau = torch.zeros(3, 6, 8)
    tau[0, :, :3] = torch.randn(6, 3, generator=g) * SCALE
    tau[1:, :, 3:] = torch.randn(2, 6, 5, generator=g) * SCALE
    base = {"w": torch.zeros(6, 8)}  # zero: the merged task vector itself, unrounded
    got = static_merge("wudi", base, {"w": tau})["w"]
    assert torch.equal(got[:, :3], tau[0, :, :3])
    torch.testing.assert_close(got @ tau[0].T, tau[0] @ tau[0].T, rtol=0, atol=1e-12)
    assert (got[:, 3:] - tau[1:, :, 3:].sum(0)).abs().max() > 1e-4
    # every task on its own coordinates: no interference at the start, the merge is the sum
    tau[2, :, 3:5] = 0
    tau[1, :, 5:] = 0
    assert torch.equal(static_merge("wudi", base, {"w": tau})["w"], tau.sum(0))


def test_non_matrix_tensors_are_the_scaled_mean_and_untouched_rows_stay():
    base, tvs = make(3, seed=7)
    emb = "embeddings.word_embeddings.weight"
    tvs[emb][:, 4] = 0  # a token no expert changed
    merged = static_merge("wudi", base, tvs, lambda_=0.5)
    for name in ("encoder.layer.0.output.dense.bias", "conv.weight"):
        torch.testing.assert_close(merged[name], base[name] + 0.5 * tvs[name].mean(0))
    assert torch.equal(merged[emb][4], base[emb][4])
    assert not torch.allclose(merged[emb], base[emb] + 0.5 * tvs[emb].sum(0), rtol=0, atol=1e-5)


def test_zero_task_vectors_are_harmless():
    base, tvs = make(3, seed=8)
    zero = {n: torch.zeros_like(v) for n, v in tvs.items()}
    for name, tensor in static_merge("wudi", base, zero).items():
        assert torch.equal(tensor, base[name])  # a frozen layer stays frozen, no NaN from 1 / ||0||^2
    with_frozen = {n: torch.cat([v, torch.zeros_like(v[:1])]) for n, v in tvs.items()}  # a 4th, zero task
    got, want = static_merge("wudi", base, with_frozen), static_merge("wudi", base, tvs)
    for name in MATRICES:  # a zero task adds no loss term (non-matrix tensors: the mean over 4 tasks)
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-9)


def test_deterministic_order_free_and_dtype_kept():
    base, tvs = make(3, seed=9)
    first = static_merge("wudi", base, tvs)
    assert all(torch.equal(first[n], v) for n, v in static_merge("wudi", base, tvs).items())
    flipped = static_merge("wudi", base, {n: v.flip(0) for n, v in tvs.items()})
    for name in base:
        torch.testing.assert_close(flipped[name], first[name], rtol=0, atol=1e-6)
    half = static_merge(
        "wudi", {n: v.bfloat16() for n, v in base.items()}, {n: v.bfloat16() for n, v in tvs.items()}
    )
    assert all(half[n].dtype == torch.bfloat16 and half[n].shape == base[n].shape for n in base)


# ------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"iterations": 0}, r"^WUDI iterations must be an integer >= 1 .*got 0: pass e.g. iterations=300.$"),
        ({"iterations": -5}, r"^WUDI iterations must be an integer >= 1 .*got -5"),
        ({"iterations": 2.5}, r"^WUDI iterations must be an integer >= 1 .*got 2\.5"),
        ({"iterations": True}, r"^WUDI iterations must be an integer >= 1 .*got True"),
        ({"lr": 0.0}, r"^WUDI lr must be a finite number > 0 .*got 0\.0: pass e\.g\. lr=1e-05\.$"),
        ({"lr": -1e-5}, r"^WUDI lr must be a finite number > 0 .*got -1e-05"),
        ({"lr": float("nan")}, r"^WUDI lr must be a finite number > 0 .*got nan"),
        ({"lr": "1e-5"}, r"^WUDI lr must be a finite number > 0 .*got '1e-5'"),
        ({"lambda_": float("inf")}, r"^lambda_ must be a finite number"),
        ({"lambda": 1.0}, r"^Unknown option 'lambda'.*'wudi'.*spelled lambda_"),
        ({"steps": 10}, r"^Unknown option 'steps'.*\['iterations', 'lr', 'lambda_'\]"),
    ],
)
def test_bad_options_are_one_line_errors_before_any_tensor(options, words):
    with pytest.raises(DivMergeError, match=words) as checked:
        check_method("wudi", options)
    assert "\n" not in str(checked.value)
    base, tvs = make(2)
    with pytest.raises(DivMergeError) as merged:
        static_merge("wudi", base, tvs, **options)
    assert str(merged.value) == str(checked.value)


def test_registry_entry_defaults_and_benchmark_method():
    spec = STATIC_METHODS["wudi"]
    assert spec.options == ("iterations", "lr", "lambda_") and "ICML 2025" in spec.reference
    assert (WUDI_ITERATIONS, WUDI_LR, WUDI_LAMBDA) == (300, 1e-5, 1.0)  # the paper's
    assert "wudi" in mq.STATIC and "wudi" in mq.DEFAULT_METHODS and mq.is_static("wudi")
    assert mq.is_valid_method("js-row@wudi")


# -------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def expert_set(tiny):
    return load_experts(tiny["base"], tiny["experts"])


def test_merges_a_tiny_bert_expert_set(expert_set):
    got = static_merge("wudi", expert_set.base, expert_set.task_vectors, iterations=20, lr=1e-3)
    assert list(got) == list(expert_set.base)
    for name, theta0 in expert_set.base.items():
        assert got[name].shape == theta0.shape and got[name].dtype == theta0.dtype
        assert torch.isfinite(got[name]).all(), name
    tau = expert_set.task_vectors[MATRIX].float()
    total = expert_set.base[MATRIX] + tau.sum(0)
    assert not torch.allclose(got[MATRIX], total)  # it moved away from the start ...
    assert interference(got[MATRIX] - expert_set.base[MATRIX], tau) < interference(tau.sum(0), tau)


def test_start_from_wudi_is_step_zero_of_a_learned_merge(expert_set):
    options = {"iterations": 10, "lr": 1e-3}
    merger = Merger.from_expert_set(expert_set, granularity="layer", start_from="wudi", start_options=options)
    merged = merger.build()
    learned, start = merger.learned_params(), merger.static_params("wudi", options)
    assert learned.keys() == start.keys()
    for name, tensor in start.items():
        torch.testing.assert_close(learned[name], tensor)
    assert not torch.allclose(start[f"bert.{MATRIX}"], merger.static_params("tsv_m")[f"bert.{MATRIX}"])
    logits(merged, 0, None).sum().backward()  # gradients reach the coefficients through the start
    assert merged.coefficients.weight.grad.abs().sum() > 0
    with pytest.raises(DivMergeError, match=r"start_from.*WUDI lr must be"):
        Merger.from_expert_set(expert_set, start_from="wudi", start_options={"lr": 0})
