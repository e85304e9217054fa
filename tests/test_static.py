import inspect
import math

import pytest
import torch

from divmerge.errors import DivMergeError
from divmerge.static import STATIC_METHODS, StaticMethod, check_method, static_merge, tensor_seed

SHAPES = {
    "embeddings.word_embeddings.weight": (11, 6),
    "encoder.layer.0.attention.self.query.weight": (6, 6),
    "encoder.layer.0.output.dense.bias": (6,),
    "encoder.layer.0.output.LayerNorm.weight": (6,),
}


def make(num_tasks: int = 3, seed: int = 0, shapes: dict | None = None) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    shapes = SHAPES if shapes is None else shapes
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    tvs = {n: torch.randn((num_tasks, *s), generator=g) for n, s in shapes.items()}
    return base, tvs


def deltas(merged: dict, base: dict) -> dict:
    return {n: merged[n] - base[n] for n in base}


def assert_same(a: dict, b: dict, exact: bool = False) -> None:
    assert list(a) == list(b)
    for n in a:
        if exact:
            assert torch.equal(a[n], b[n]), n
        else:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)


def ties_reference(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Independent TIES on one (T, n) tensor: loops and sorting, no peft, no topk."""
    out = torch.zeros(tau.shape[1])
    k = max(1, math.floor(density * tau.shape[1] + 0.5))
    trimmed = torch.zeros_like(tau)
    for t in range(tau.shape[0]):
        order = sorted(range(tau.shape[1]), key=lambda i, t=t: -abs(tau[t, i].item()))
        for i in order[:k]:
            trimmed[t, i] = tau[t, i]
    for i in range(tau.shape[1]):
        elected = 1.0 if trimmed[:, i].sum() >= 0 else -1.0
        agree = [v.item() for v in trimmed[:, i] if v != 0 and math.copysign(1.0, v.item()) == elected]
        out[i] = sum(agree) / len(agree) if agree else 0.0
    return out


# ------------------------------------------------------------------------------- average / task arithmetic


@pytest.mark.parametrize("num_tasks", [1, 3, 5])
def test_average_is_task_arithmetic_with_one_over_t(num_tasks):
    base, tvs = make(num_tasks)
    assert_same(
        static_merge("average", base, tvs), static_merge("task_arithmetic", base, tvs, lambda_=1 / num_tasks)
    )


def test_task_arithmetic_formula_and_default():
    base, tvs = make(4, seed=1)
    got = static_merge("task_arithmetic", base, tvs, lambda_=-0.7)
    assert_same(got, {n: base[n] + -0.7 * sum(tvs[n][t] for t in range(4)) for n in base})
    default = static_merge("task_arithmetic", base, tvs)
    assert_same(default, {n: base[n] + 0.3 * tvs[n].sum(0) for n in base})
    assert not torch.allclose(default[next(iter(base))], got[next(iter(base))])


def test_average_differs_from_plain_sum():
    base, tvs = make(3)
    got = static_merge("average", base, tvs)
    name = next(iter(base))
    assert not torch.allclose(got[name], base[name] + tvs[name].sum(0))


# ------------------------------------------------------------------------------------------------- TIES


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ties_full_density_same_sign_is_scaled_mean(sign):
    base, tvs = make(3, seed=2)
    tvs = {n: sign * (v.abs() + 1e-3) for n, v in tvs.items()}
    got = static_merge("ties", base, tvs, density=1.0, lambda_=0.7)
    assert_same(got, {n: base[n] + 0.7 * tvs[n].mean(0) for n in base})


def test_ties_hand_computed():
    base = {"w": torch.zeros(7)}
    tvs = {
        "w": torch.tensor(
            [
                [3.0, -1.0, 2.0, 0.5, 4.0, 0.1, 2.5],
                [-1.0, -4.0, -3.0, 0.2, 2.0, 0.3, -2.5],
            ]
        )
    }
    # density 0.5 of 7 entries keeps round(3.5) = 4 per task:
    #   task 0 keeps 4, 3, 2.5, 2        -> [3, 0, 2, 0, 4, 0, 2.5]
    #   task 1 keeps -4, -3, -2.5, 2     -> [0, -4, -3, 0, 2, 0, -2.5]
    # elected sign of the sums [3, -4, -1, 0, 6, 0, 0] -> [+, -, -, +, +, +, +] (zero sum elects +)
    # disjoint mean over agreeing non-zeros -> [3, -4, -3, 0, (4+2)/2, 0, 2.5]
    got = static_merge("ties", base, tvs, density=0.5, lambda_=0.5)
    expected = 0.5 * torch.tensor([3.0, -4.0, -3.0, 0.0, 3.0, 0.0, 2.5])
    assert torch.equal(got["w"], expected)
    torch.testing.assert_close(got["w"], ties_reference(tvs["w"], 0.5) * 0.5)


def test_ties_default_lambda_is_one_and_base_added():
    base = {"w": torch.full((7,), 10.0)}
    tvs = {"w": torch.tensor([[3.0, -1.0, 2.0, 0.5, 4.0, 0.1, 2.5], [-1.0, -4.0, -3.0, 0.2, 2.0, 0.3, -2.5]])}
    got = static_merge("ties", base, tvs, density=0.5)
    assert torch.equal(got["w"], 10.0 + torch.tensor([3.0, -4.0, -3.0, 0.0, 3.0, 0.0, 2.5]))


@pytest.mark.parametrize("density", [0.05, 0.2, 0.29, 0.5, 0.9])
def test_ties_keeps_density_fraction_of_largest(density):
    n = 1000
    tau = torch.randn(1, n, generator=torch.Generator().manual_seed(3))
    got = static_merge("ties", {"w": torch.zeros(n)}, {"w": tau}, density=density)["w"]
    kept = got != 0
    assert int(kept.sum()) == round(density * n)  # T = 1: TIES' delta is the trimmed tau itself
    assert torch.equal(got[kept], tau[0][kept])
    assert tau[0][kept].abs().min() > tau[0][~kept].abs().max()


def test_ties_tiny_tensor_keeps_at_least_one_entry():
    got = static_merge("ties", {"b": torch.zeros(3)}, {"b": torch.tensor([[0.1, -5.0, 0.2]])}, density=0.1)
    assert torch.equal(got["b"], torch.tensor([0.0, -5.0, 0.0]))


@pytest.mark.parametrize("density", [0.1, 0.3, 1.0])
def test_ties_matches_independent_reference(density):
    base, tvs = make(3, seed=4, shapes={"a": (5, 8), "b": (9,)})
    got = static_merge("ties", base, tvs, density=density, lambda_=1.3)
    for n in base:
        ref = ties_reference(tvs[n].reshape(3, -1), density).reshape(base[n].shape)
        torch.testing.assert_close(got[n], base[n] + 1.3 * ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- DARE


def test_dare_p0_is_the_underlying_method():
    base, tvs = make(3, seed=5)
    assert_same(static_merge("dare", base, tvs, p=0.0, seed=7), static_merge("task_arithmetic", base, tvs))
    assert_same(
        static_merge("dare", base, tvs, p=0.0, then="ties", density=0.4, lambda_=0.8),
        static_merge("ties", base, tvs, density=0.4, lambda_=0.8),
    )
    assert_same(static_merge("dare", base, tvs, p=0.0, then="ties"), static_merge("ties", base, tvs))


@pytest.mark.parametrize("then", ["task_arithmetic", "ties"])
def test_dare_seeded_determinism(then):
    base, tvs = make(3, seed=6)
    a = static_merge("dare", base, tvs, p=0.5, seed=1, then=then)
    b = static_merge("dare", base, tvs, p=0.5, seed=1, then=then)
    c = static_merge("dare", base, tvs, p=0.5, seed=2, then=then)
    assert_same(a, b, exact=True)
    assert any(not torch.equal(a[n], c[n]) for n in base)
    assert not torch.equal(
        a[next(iter(base))], static_merge("dare", base, tvs, p=0.5, then=then)[next(iter(base))]
    )


def test_dare_is_independent_of_dict_order_and_global_rng():
    base, tvs = make(3, seed=7)
    a = static_merge("dare", base, tvs, p=0.3, seed=3)
    torch.manual_seed(123)
    rev_base = dict(reversed(list(base.items())))
    rev_tvs = dict(reversed(list(tvs.items())))
    b = static_merge("dare", rev_base, rev_tvs, p=0.3, seed=3)
    assert list(b) == list(rev_base)
    for n in base:
        assert torch.equal(a[n], b[n]), n
    # Only its own tensor's mask depends on the name: a tensor's result does not change when others go.
    name = next(iter(base))
    alone = static_merge("dare", {name: base[name]}, {name: tvs[name]}, p=0.3, seed=3)
    assert torch.equal(alone[name], a[name])


def test_dare_masks_differ_between_tensors():
    tau = torch.ones(2, 64)
    got = static_merge("dare", {"x": torch.zeros(64), "y": torch.zeros(64)}, {"x": tau, "y": tau}, p=0.5)
    assert not torch.equal(got["x"], got["y"])  # not one mask reused for every same-shaped tensor


def test_dare_rescaling_preserves_expected_value():
    n, num_tasks, p, lam = 200_000, 3, 0.5, 0.3
    tau = torch.rand(num_tasks, n, generator=torch.Generator().manual_seed(8)) + 0.5  # positive, mean 1
    base = {"w": torch.zeros(n)}
    got = static_merge("dare", base, {"w": tau}, p=p, seed=0)["w"]
    ta = static_merge("task_arithmetic", base, {"w": tau}, lambda_=lam)["w"]
    assert abs(got.mean().item() / ta.mean().item() - 1) < 0.01  # without 1/(1-p) it would be ~0.5
    # Per task, a fraction ~p is dropped and survivors are scaled by exactly 1/(1-p).
    one = static_merge("dare", base, {"w": tau[:1]}, p=p, seed=0, lambda_=1.0)["w"]
    kept = one != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(one[kept], tau[0][kept] / (1 - p))


def test_dare_then_ties_is_ties_on_the_dropped_task_vectors():
    base, tvs = make(3, seed=9, shapes={"a": (4, 5), "b": (7,)})
    p, seed = 0.4, 5
    for density in (1.0, 0.3):
        got = static_merge("dare", base, tvs, p=p, seed=seed, then="ties", density=density, lambda_=0.9)
        for n in base:
            # the documented mask: uniform draws from a CPU generator seeded by tensor_seed(seed, name)
            g = torch.Generator().manual_seed(tensor_seed(seed, n))
            dropped = torch.where(torch.rand(tvs[n].shape, generator=g) >= p, tvs[n] / (1 - p), 0.0)
            ref = ties_reference(dropped.reshape(3, -1), density).reshape(base[n].shape)
            torch.testing.assert_close(got[n], base[n] + 0.9 * ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("method", sorted(STATIC_METHODS))
def test_registry_entries_run_and_keep_names_shapes_dtype(method):
    spec = STATIC_METHODS[method]
    assert isinstance(spec, StaticMethod) and spec.name == method
    assert spec.reference.strip() and any(str(y) in spec.reference for y in range(2020, 2030))
    params = list(inspect.signature(spec.fn).parameters)
    assert params[:2] == ["base", "task_vectors"] and tuple(params[2:]) == spec.options
    assert spec.fn.__doc__ and spec.fn.__doc__.strip()
    for num_tasks in (3, 1):
        base, tvs = make(num_tasks, seed=10)
        before = {n: v.clone() for n, v in tvs.items()}
        merged = static_merge(method, base, tvs)
        assert list(merged) == list(base)
        for n in base:
            assert merged[n].shape == base[n].shape and merged[n].dtype == torch.float32
            assert torch.isfinite(merged[n]).all()
            assert torch.equal(tvs[n], before[n])  # inputs untouched


def test_empty_set_merges_to_empty():
    assert static_merge("ties", {}, {}) == {}


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("method", "options", "words"),
    [
        ("soup", {}, r"Unknown static merge method 'soup'.*average.*task_arithmetic.*ties.*dare"),
        ("ties", {"k": 0.2}, r"Unknown option 'k'.*'ties'.*density.*lambda_"),
        ("task_arithmetic", {"lambda": 0.3}, r"Unknown option 'lambda'.*spelled lambda_"),
        ("average", {"lambda_": 0.3}, r"Unknown option 'lambda_'.*'average'.*no options"),
        ("ties", {"density": 0.0}, r"density must be in \(0, 1\]"),
        ("ties", {"density": 1.5}, r"density must be in \(0, 1\]"),
        ("ties", {"density": float("nan")}, r"density must be in \(0, 1\]"),
        ("dare", {"then": "ties", "density": -0.1}, r"density must be in \(0, 1\]"),
        ("dare", {"p": 1.0}, r"drop probability p must be in \[0, 1\)"),
        ("dare", {"p": -0.1}, r"drop probability p must be in \[0, 1\)"),
        ("dare", {"p": "0.5"}, r"drop probability p must be in \[0, 1\)"),
        ("task_arithmetic", {"lambda_": float("inf")}, r"lambda_ must be a finite number"),
        ("ties", {"lambda_": float("nan")}, r"lambda_ must be a finite number"),
        ("dare", {"lambda_": float("-inf")}, r"lambda_ must be a finite number"),
        ("task_arithmetic", {"lambda_": None}, r"lambda_ must be a finite number"),
        ("dare", {"then": "average"}, r"then='average'.*task_arithmetic.*ties"),
        ("dare", {"density": 0.5}, r"density only applies.*then='ties'"),
        ("dare", {"seed": 1.5}, r"seed must be an integer"),
    ],
)
def test_bad_options_raise_clear_errors(method, options, words):
    base, tvs = make(2)
    with pytest.raises(DivMergeError, match=words):
        static_merge(method, base, tvs, **options)


def test_bad_tensors_raise_clear_errors():
    base, tvs = make(2)
    name = next(iter(base))
    with pytest.raises(DivMergeError, match="missing from task_vectors"):
        static_merge("average", base, {n: v for n, v in tvs.items() if n != name})
    with pytest.raises(DivMergeError, match=r"\(T, \*base_shape\)"):
        static_merge("average", base, {**tvs, name: tvs[name][0]})
    with pytest.raises(DivMergeError, match="same number T"):
        static_merge("average", base, {**tvs, name: tvs[name][:1]})


# --------------------------------------------------------------------------------------- check_method


@pytest.mark.parametrize(
    ("method", "options", "words"),
    [
        ("soup", {}, r"^Unknown static merge method 'soup': use one of \['average', 'task_arithmetic', "),
        (
            "ties",
            {"p": 0.5},
            r"^Unknown option 'p' for static merge method 'ties' \(it takes no option 'p'\): use one of its "
            r"options \['dens",
        ),
        (
            "average",
            {"lambda_": 0.3},
            r"^Unknown option 'lambda_' for static merge method 'average' \(it takes no option 'lambda_'\): "
            r"it takes no options at all\.$",
        ),
        ("ties", {"density": 1.5}, r"^TIES density must be in \(0, 1\].*got 1\.5"),
        ("dare", {"p": 1.0}, r"^DARE drop probability p must be in \[0, 1\), got 1\.0"),
        ("dare", {"then": "average"}, r"^DARE then='average' is not a combiner"),
        ("task_arithmetic", {"lambda_": float("nan")}, r"^lambda_ must be a finite number, got nan"),
    ],
)
def test_check_method_rejects_name_option_and_value(method, options, words):
    with pytest.raises(DivMergeError, match=words):
        check_method(method, options)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("ties", {"k": 0.2}),
        ("dare", {"p": 1.5}),
        ("dare", {"density": 0.5}),
        ("task_arithmetic", {"lambda": 0.3}),
        ("soup", {}),
    ],
)
def test_check_method_raises_what_static_merge_raises(method, options):
    base, tvs = make(2)
    with pytest.raises(DivMergeError) as merged:
        static_merge(method, base, tvs, **options)
    with pytest.raises(DivMergeError) as checked:
        check_method(method, options)
    assert str(checked.value) == str(merged.value)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("average", {}),
        ("task_arithmetic", {"lambda_": 0.5}),
        ("ties", {}),
        ("ties", {"density": 1, "lambda_": 2.0}),
        ("dare", {"p": 0.0, "seed": 3, "then": "ties", "lambda_": 1.0, "density": 0.5}),
    ],
)
def test_check_method_accepts_valid_options(method, options):
    assert check_method(method, options) is None
