"""The SVD static merges: TSV-M (tsv_m), Iso-C (iso_c) and Iso-CTS (iso_cts)."""

import itertools

import pytest
import torch

from benchmarks import merge_quality as mq
from divmerge.errors import DivMergeError
from divmerge.families import load_experts
from divmerge.static import STATIC_METHODS, check_method, static_merge
from divmerge.static.common import polar
from divmerge.static.iso import subspace_sizes
from divmerge.static.tsv import kept_per_task
from tests.test_static import make as make_tensors

SVD_METHODS = ("tsv_m", "iso_c", "iso_cts")
SHAPES = {
    "embeddings.word_embeddings.weight": (11, 6),
    "encoder.layer.0.attention.self.query.weight": (6, 6),
    "encoder.layer.0.intermediate.dense.weight": (9, 6),
    "encoder.layer.0.output.dense.weight": (6, 9),
    "encoder.layer.0.output.dense.bias": (6,),
    "encoder.layer.0.output.LayerNorm.weight": (6,),
    "conv.weight": (2, 2, 3),
}
MATRICES = [n for n, s in SHAPES.items() if len(s) == 2]


def make(num_tasks: int = 3, seed: int = 0, shapes: dict | None = None) -> tuple[dict, dict]:
    """Random base and task vectors over this file's SHAPES (test_static's, with matrices of every kind)."""
    return make_tensors(num_tasks, seed, SHAPES if shapes is None else shapes)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(x.double(), full_matrices=False)


def polar_eigh(x: torch.Tensor) -> torch.Tensor:
    """Reference polar factor of a full-column-rank x by another route: x (x^T x)^(-1/2)."""
    x = x.double()
    evals, evecs = torch.linalg.eigh(x.T @ x)
    return x @ (evecs * evals.rsqrt()) @ evecs.T


def ref_tsv(tau: torch.Tensor, k: int) -> torch.Tensor:
    """Independent TSV-M of full-rank task matrices (T * k <= min(m, n)), in float64."""
    parts = [svd(t) for t in tau]
    u = torch.cat([p[0][:, :k] for p in parts], 1)
    s = torch.cat([p[1][:k] for p in parts])
    v = torch.cat([p[2][:k].T for p in parts], 1)
    return (polar_eigh(u) * s) @ polar_eigh(v).T


def ref_iso_cts(tau: torch.Tensor, common: int, per_task: int) -> torch.Tensor:
    """Independent Iso-CTS of full-rank task matrices, in float64."""
    u, s, vh = svd(tau.sum(0))
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common].T]
    proj = torch.eye(tau.shape[1], dtype=torch.float64) - us[0] @ us[0].T
    for t in tau:
        ut, st, vht = svd(proj @ t.double())
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vht[:per_task].T)
    return torch.cat(ss).mean() * polar_eigh(torch.cat(us, 1)) @ polar_eigh(torch.cat(vs, 1)).T


def col_space_contains(space: torch.Tensor, vectors: torch.Tensor, tol: float = 1e-4) -> bool:
    """Whether every column of ``vectors`` lies in the column space of ``space``."""
    q = svd(space)[0][:, : int(torch.linalg.matrix_rank(space.double()))]
    return bool(torch.allclose(q @ (q.T @ vectors.double()), vectors.double(), atol=tol))


# --------------------------------------------------------------------------------------------- polar


@pytest.mark.parametrize("shape", [(7, 3), (5, 5), (3, 7)])
def test_polar_is_orthonormal_and_the_closest_such_matrix(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    p = polar(x)
    small = min(shape)
    gram = p.T @ p if shape[0] >= shape[1] else p @ p.T
    close(gram, torch.eye(small), 1e-5)  # orthonormal columns (rows when wider than tall)
    if shape[0] >= shape[1]:
        close(p, polar_eigh(x).float(), 1e-5)
        for seed in range(5):  # Procrustes: no other orthonormal matrix is closer to x
            q = torch.linalg.qr(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))[0]
            assert torch.linalg.norm(x - p) <= torch.linalg.norm(x - q)
    q = torch.linalg.qr(x)[0] if shape[0] >= shape[1] else torch.linalg.qr(x.T)[0].T
    close(polar(q), q, 1e-5)  # already orthonormal: unchanged


def test_polar_of_rank_deficient_matrix_adds_no_direction():
    a = torch.linalg.qr(torch.randn(8, 2, generator=torch.Generator().manual_seed(2)))[0]  # (8, 2)
    p = polar(torch.cat([a, a], 1))  # (8, 4), rank 2: two experts sharing their directions
    close(p, torch.cat([a, a], 1) / 2**0.5, 1e-5)  # the partial isometry, no made-up completion


# -------------------------------------------------------------------------------------------------- TSV-M


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_tsv_one_task_full_rank_is_base_plus_lambda_tau(lam):
    base, tvs = make(1, seed=3)
    for options in ({"rank_fraction": 1.0}, {}):  # T = 1: the default 1/T keeps the whole rank too
        got = static_merge("tsv_m", base, tvs, lambda_=lam, **options)
        for n in base:
            close(got[n], base[n] + lam * tvs[n][0])


def test_tsv_identical_experts_merge_to_that_expert():
    base, tvs = make(1, seed=4)
    three = {n: v.expand(3, *v.shape[1:]).clone() for n, v in tvs.items()}
    got = static_merge("tsv_m", base, three, rank_fraction=1.0)
    for n in base:
        close(got[n], base[n] + tvs[n][0])


@pytest.mark.parametrize(("num_tasks", "fraction"), [(3, None), (2, None), (2, 0.25), (3, 1 / 6)])
def test_tsv_matches_independent_reference_and_keeps_singular_values(num_tasks, fraction):
    base, tvs = make(num_tasks, seed=5)
    options = {} if fraction is None else {"rank_fraction": fraction}
    got = static_merge("tsv_m", base, tvs, lambda_=0.7, **options)
    for n in MATRICES:
        tau = tvs[n]
        k = kept_per_task(min(tau.shape[1:]), num_tasks, fraction)
        delta = (got[n] - base[n]) / 0.7
        close(delta, ref_tsv(tau, k).float())
        # U_perp and V_perp are orthonormal, so the kept singular values are the merged ones exactly.
        kept = torch.cat([svd(t)[1][:k] for t in tau]).sort(descending=True).values
        close(svd(delta)[1][: kept.numel()], kept, 1e-4)
        assert torch.linalg.matrix_rank(delta) == kept.numel()
        # The merge lies in the span of the kept left singular vectors of every task.
        lefts = torch.cat([svd(t)[0][:, :k] for t in tau], 1)
        assert col_space_contains(lefts, delta.double())


def test_tsv_kept_per_task():
    assert kept_per_task(768, 8, None) == 96  # the paper's 1/T
    assert kept_per_task(6, 3, None) == 2
    assert kept_per_task(6, 20, None) == 1  # never zero components
    assert kept_per_task(6, 3, 0.5) == 3
    assert kept_per_task(6, 3, 0.01) == 1
    assert kept_per_task(6, 3, 1.0) == 6
    assert kept_per_task(9, 3, 1 / 3) == 3  # no floor-of-2.9999 loss


def test_tsv_more_components_than_rank_still_runs():
    base, tvs = make(3, seed=6)
    got = static_merge("tsv_m", base, tvs, rank_fraction=1.0)  # K = 3r > r: polar factors are wide
    for n in base:
        assert got[n].shape == base[n].shape and torch.isfinite(got[n]).all()
    assert not torch.allclose(got[MATRICES[1]], static_merge("tsv_m", base, tvs)[MATRICES[1]])


# -------------------------------------------------------------------------------------------------- Iso-C


@pytest.mark.parametrize("lam", [1.0, 1.5])
def test_iso_c_is_isotropic_at_the_mean_singular_value_of_the_sum(lam):
    base, tvs = make(3, seed=7)
    got = static_merge("iso_c", base, tvs, lambda_=lam)
    for n in MATRICES:
        u, s, vh = svd(tvs[n].sum(0))
        delta = got[n] - base[n]
        close(svd(delta)[1].float(), torch.full((s.numel(),), lam * s.mean().item()))  # isotropic
        close(delta, (lam * s.mean() * u @ vh).float())  # in the sum's singular directions


def test_iso_c_one_rank_one_task_is_base_plus_lambda_tau():
    g = torch.Generator().manual_seed(8)
    tau = torch.randn(1, 7, 1, generator=g) @ torch.randn(1, 1, 5, generator=g)  # (1, 7, 5), rank 1
    base = {"w": torch.randn(7, 5, generator=g)}
    close(static_merge("iso_c", base, {"w": tau}, lambda_=0.5)["w"], base["w"] + 0.5 * tau[0])


# ------------------------------------------------------------------------------------------------ Iso-CTS


@pytest.mark.parametrize(
    ("rank", "num_tasks", "fraction", "expected"),
    [
        (6, 3, 0.8, (3, 1)),
        (768, 8, 0.8, (616, 19)),
        (6, 3, 1.0, (6, 0)),
        (1, 3, 0.8, (1, 0)),
        (5, 3, 0.01, (2, 1)),
    ],
)
def test_iso_cts_subspace_sizes(rank, num_tasks, fraction, expected):
    assert subspace_sizes(rank, num_tasks, fraction) == expected


def test_iso_cts_subspace_sizes_always_fill_the_rank():
    for rank, num_tasks, tenths in itertools.product(range(1, 40), range(1, 13), range(1, 11)):
        common, per_task = subspace_sizes(rank, num_tasks, tenths / 10)
        assert common >= 0 and per_task >= 0 and common + num_tasks * per_task == rank


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_iso_cts_with_common_fraction_one_is_iso_c(num_tasks):
    base, tvs = make(num_tasks, seed=9)
    iso_c = static_merge("iso_c", base, tvs, lambda_=1.3)
    for n, v in static_merge("iso_cts", base, tvs, common_fraction=1.0, lambda_=1.3).items():
        close(v, iso_c[n])


def test_iso_cts_with_one_task_is_iso_c():
    base, tvs = make(1, seed=10)
    iso_c = static_merge("iso_c", base, tvs)
    for n, v in static_merge("iso_cts", base, tvs).items():
        close(v, iso_c[n])


@pytest.mark.parametrize(("num_tasks", "fraction"), [(3, 0.8), (2, 0.5), (3, 0.1)])
def test_iso_cts_matches_reference_is_isotropic_and_spans_both_subspaces(num_tasks, fraction):
    base, tvs = make(num_tasks, seed=11)
    got = static_merge("iso_cts", base, tvs, common_fraction=fraction, lambda_=0.9)
    differs = False
    for n in MATRICES:
        tau = tvs[n]
        rank = min(tau.shape[1:])
        common, per_task = subspace_sizes(rank, num_tasks, fraction)
        delta = (got[n] - base[n]) / 0.9
        ref = ref_iso_cts(tau, common, per_task)
        close(delta, ref.float())
        s = svd(delta)[1]
        close(s, torch.full_like(s, s[0].item()))  # isotropic, full rank
        assert s.numel() == rank
        u, _, _ = svd(tau.sum(0))
        assert col_space_contains(delta, u[:, :common])  # the common subspace is kept
        proj = torch.eye(tau.shape[1], dtype=torch.float64) - u[:, :common] @ u[:, :common].T
        for t in tau:  # and each task's top direction outside it
            assert per_task == 0 or col_space_contains(delta, svd(proj @ t.double())[0][:, :1])
        differs |= not torch.allclose(got[n], static_merge("iso_c", base, tvs, lambda_=0.9)[n])
    assert differs  # task-specific subspaces change the merge


# ------------------------------------------------------------------------------------------ all three


@pytest.mark.parametrize("method", SVD_METHODS)
def test_non_matrix_tensors_are_the_scaled_mean(method):
    base, tvs = make(3, seed=12)
    got = static_merge(method, base, tvs, lambda_=0.6)
    for n, shape in SHAPES.items():
        if len(shape) != 2:
            close(got[n], base[n] + 0.6 * tvs[n].mean(0), 1e-6)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_untouched_embedding_rows_stay_unchanged(method):
    base, tvs = make(2, seed=13, shapes={"emb": (11, 6)})
    tvs["emb"][:, 4:] = 0.0  # only tokens 0..3 changed in any expert: the sum has rank 4 < 6
    got = static_merge(method, base, tvs)["emb"]
    torch.testing.assert_close(got[4:], base["emb"][4:], rtol=0, atol=1e-6)  # exact here; no LAPACK bets
    assert not torch.allclose(got[:4], base["emb"][:4])


@pytest.mark.parametrize("method", SVD_METHODS)
def test_zero_task_vectors_leave_base_unchanged(method):
    base, tvs = make(3, seed=14)
    got = static_merge(method, base, {n: torch.zeros_like(v) for n, v in tvs.items()})
    for n in base:
        assert torch.equal(got[n], base[n]), n


@pytest.mark.parametrize("method", SVD_METHODS)
def test_task_order_does_not_matter_and_lambda_scales(method):
    base, tvs = make(3, seed=15)
    got = static_merge(method, base, tvs)
    flipped = static_merge(method, base, {n: v.flip(0) for n, v in tvs.items()})
    doubled = static_merge(method, base, tvs, lambda_=2.0)
    for n in base:
        close(flipped[n], got[n])
        close(doubled[n] - base[n], 2 * (got[n] - base[n]))


@pytest.mark.parametrize("method", SVD_METHODS)
def test_bf16_in_bf16_out_and_shapes_kept(method):
    base, tvs = make(3, seed=16)
    base16 = {n: v.bfloat16() for n, v in base.items()}
    tvs16 = {n: v.bfloat16() for n, v in tvs.items()}
    got = static_merge(method, base16, tvs16)
    want = static_merge(
        method, {n: v.float() for n, v in base16.items()}, {n: v.float() for n, v in tvs16.items()}
    )
    assert list(got) == list(base)
    for n in base:
        assert got[n].dtype == torch.bfloat16 and got[n].shape == base[n].shape
        assert torch.equal(got[n], want[n].bfloat16())  # computed in float32, cast once


@pytest.mark.parametrize("method", SVD_METHODS)
def test_non_finite_task_matrix_is_refused(method):
    base, tvs = make(2, seed=17)
    tvs[MATRICES[0]][1, 2, 3] = float("nan")
    with pytest.raises(DivMergeError, match=rf"^Task vector '{MATRICES[0]}' has NaN or infinite entries"):
        static_merge(method, base, tvs)


@pytest.mark.parametrize("tv_dtype", [None, torch.bfloat16])
def test_merges_a_tiny_bert_expert_set(tiny, tv_dtype):
    experts = load_experts(tiny["base"], tiny["experts"], task_vector_dtype=tv_dtype)
    for method in SVD_METHODS:
        got = static_merge(method, experts.base, experts.task_vectors)
        assert list(got) == list(experts.base)
        for n, theta0 in experts.base.items():
            assert got[n].shape == theta0.shape and got[n].dtype == theta0.dtype
            assert torch.isfinite(got[n]).all(), (method, n)
            tau = experts.task_vectors[n].float()
            if tau.dim() != 3:
                close(got[n], theta0 + tau.mean(0), 1e-6)
        emb = "embeddings.word_embeddings.weight"  # (30522, 16): treated as a matrix like every 2-D tensor
        assert not torch.allclose(got[emb], experts.base[emb] + experts.task_vectors[emb].float().mean(0))


def test_registry_entries_and_benchmark_methods():
    assert STATIC_METHODS["tsv_m"].options == ("rank_fraction", "lambda_")
    assert STATIC_METHODS["iso_c"].options == ("lambda_",)
    assert STATIC_METHODS["iso_cts"].options == ("common_fraction", "lambda_")
    assert "CVPR 2025" in STATIC_METHODS["tsv_m"].reference
    assert all("ICML 2025" in STATIC_METHODS[m].reference for m in ("iso_c", "iso_cts"))
    for method in SVD_METHODS:
        assert method in mq.STATIC and method in mq.DEFAULT_METHODS and mq.is_static(method)


# ------------------------------------------------------------------------------------------------ errors

BAD_OPTIONS = [
    ("tsv_m", {"rank_fraction": 0.0}, r"^TSV-M rank_fraction must be in \(0, 1\].*got 0\.0"),
    ("tsv_m", {"rank_fraction": 1.5}, r"^TSV-M rank_fraction must be in \(0, 1\].*None means 1/T"),
    ("tsv_m", {"rank_fraction": -0.2}, r"^TSV-M rank_fraction must be in \(0, 1\]"),
    ("tsv_m", {"rank_fraction": float("nan")}, r"^TSV-M rank_fraction must be in \(0, 1\]"),
    ("tsv_m", {"rank_fraction": "0.5"}, r"^TSV-M rank_fraction must be in \(0, 1\]"),
    ("tsv_m", {"rank_fraction": True}, r"^TSV-M rank_fraction must be in \(0, 1\]"),
    ("tsv_m", {"lambda_": float("inf")}, r"^lambda_ must be a finite number"),
    ("iso_c", {"lambda_": float("nan")}, r"^lambda_ must be a finite number"),
    ("iso_c", {"lambda_": None}, r"^lambda_ must be a finite number"),
    ("iso_cts", {"common_fraction": 0}, r"^Iso-CTS common_fraction must be in \(0, 1\].*1 is Iso-C"),
    (
        "iso_cts",
        {"common_fraction": 1.01},
        r"^Iso-CTS common_fraction must be in \(0, 1\].*common_fraction=0\.8",
    ),
    ("iso_cts", {"common_fraction": None}, r"^Iso-CTS common_fraction must be in \(0, 1\]"),
    ("iso_cts", {"lambda_": float("-inf")}, r"^lambda_ must be a finite number"),
    (
        "tsv_m",
        {"alpha": 1.0},
        r"^Unknown option 'alpha' for static merge method 'tsv_m'.*rank_fraction.*lambda_",
    ),
    ("tsv_m", {"lambda": 1.0}, r"^Unknown option 'lambda'.*spelled lambda_"),
    ("iso_c", {"common_fraction": 0.8}, r"^Unknown option 'common_fraction' for static merge method 'iso_c'"),
    ("iso_cts", {"rank_fraction": 0.5}, r"^Unknown option 'rank_fraction'.*'iso_cts'.*common_fraction"),
]


@pytest.mark.parametrize(("method", "options", "words"), BAD_OPTIONS)
def test_bad_options_raise_the_same_clear_error_in_merge_and_check(method, options, words):
    base, tvs = make(2)
    with pytest.raises(DivMergeError, match=words) as merged:
        static_merge(method, base, tvs, **options)
    with pytest.raises(DivMergeError, match=words) as checked:
        check_method(method, options)
    assert str(checked.value) == str(merged.value)
    assert "\n" not in str(merged.value)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("tsv_m", {}),
        ("tsv_m", {"rank_fraction": None, "lambda_": 1.0}),
        ("tsv_m", {"rank_fraction": 1, "lambda_": 0.3}),
        ("iso_c", {"lambda_": 1.5}),
        ("iso_cts", {"common_fraction": 1.0}),
        ("iso_cts", {"common_fraction": 0.05, "lambda_": 2}),
    ],
)
def test_check_method_accepts_valid_options(method, options):
    assert check_method(method, options) is None


def test_an_svd_that_fails_to_converge_is_redone_in_float64(monkeypatch):
    """LAPACK's float32 SVD failed on Iso-CTS's vectors of a real embedding: it is redone in float64."""
    from divmerge.static import common

    svd = torch.linalg.svd
    calls = []

    def flaky(x, full_matrices=True):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return svd(x, full_matrices=full_matrices)

    x = torch.randn(6, 4)
    want = svd(x, full_matrices=False)
    monkeypatch.setattr(torch.linalg, "svd", flaky)
    u, s, vh = common.nonzero_svd(x)
    assert calls == [torch.float32, torch.float64] and u.dtype == s.dtype == vh.dtype == torch.float32
    assert torch.allclose(s, want[1], atol=1e-5) and torch.allclose(u * s @ vh, x, atol=1e-5)
