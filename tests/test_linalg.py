"""Extreme singular values: exact and Krylov paths against numpy on matrices of known spectrum."""

import json

import numpy as np
import pytest
import torch

from dino_skipless.linalg import (
    extreme_singular_values,
    golub_kahan_extremes,
    is_singular,
    kappa_gram,
    lanczos_extremes,
)


def _with_spectrum(svals: np.ndarray, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(svals))))
    v, _ = np.linalg.qr(rng.standard_normal((len(svals), len(svals))))
    return (u * svals) @ v.T


def _ops(a: np.ndarray):
    t = torch.from_numpy(a)
    return (lambda v: t @ v), (lambda u: t.T @ u)


@pytest.mark.parametrize("gram", [False, True])
def test_exact_matches_numpy(gram):
    a = np.random.default_rng(1).standard_normal((40, 30))
    ext = extreme_singular_values(torch.from_numpy(a), gram=gram)
    s = np.linalg.svd(a, compute_uv=False)
    assert ext.smax == pytest.approx(s[0], rel=1e-10)
    assert ext.smin == pytest.approx(s[-1], rel=1e-8)
    assert ext.method == "exact" and not ext.singular


def test_golub_kahan_full_krylov_is_exact():
    # Ill-conditioned square map (kappa 1e8): working on M (not M^T M) keeps s_min accurate.
    svals = np.geomspace(1e3, 1e-5, 50)
    a = _with_spectrum(svals, 50)
    mv, rmv = _ops(a)
    ext = golub_kahan_extremes(mv, rmv, 50, 50, max_iter=100, seed=3)
    s = np.linalg.svd(a, compute_uv=False)
    assert ext.converged
    assert ext.smax == pytest.approx(s[0], rel=1e-10)
    assert ext.smin == pytest.approx(s[-1], rel=1e-5)


def test_golub_kahan_converges_early_on_separated_extremes():
    # 400-dim map whose extremes are isolated: Krylov finds both long before 400 steps and the
    # residual bounds certify them.
    rng = np.random.default_rng(2)
    svals = np.concatenate([[8.0, 6.0], rng.uniform(2.0, 3.0, 396), [0.5, 0.3]])
    a = _with_spectrum(svals, 400, seed=4)
    mv, rmv = _ops(a)
    ext = golub_kahan_extremes(mv, rmv, 400, 400, max_iter=300, tol=1e-10, seed=0)
    assert ext.converged and ext.iters < 300
    assert abs(ext.smax - 8.0) / 8.0 < 1e-8
    assert abs(ext.smin - 0.3) / 0.3 < 1e-6
    assert ext.smin_resid <= 1e-10 * ext.smax


def test_golub_kahan_ritz_values_are_inner_bounds():
    svals = np.linspace(1.0, 2.0, 300)
    a = _with_spectrum(svals, 300, seed=5)
    mv, rmv = _ops(a)
    ext = golub_kahan_extremes(mv, rmv, 300, 300, max_iter=15, seed=0)
    assert not ext.converged and ext.iters == 15
    assert ext.smax <= 2.0 + 1e-12 and ext.smin >= 1.0 - 1e-12


def test_lanczos_matches_eigvalsh():
    rng = np.random.default_rng(6)
    ev = np.concatenate([[50.0], rng.uniform(1.0, 5.0, 150), [0.01]])
    q, _ = np.linalg.qr(rng.standard_normal((152, 152)))
    s = (q * ev) @ q.T
    t = torch.from_numpy(s)
    out = lanczos_extremes(lambda v: t @ v, 152, max_iter=152, tol=1e-12, seed=1)
    assert out.converged
    assert out.lmax == pytest.approx(50.0, rel=1e-10)
    assert out.lmin == pytest.approx(0.01, rel=1e-6)


def test_singular_map_reports_finite_json_safe_kappa():
    a = np.random.default_rng(7).standard_normal((20, 5))
    a = a @ a.T  # rank 5 of 20
    ext = extreme_singular_values(torch.from_numpy(a))
    assert ext.singular and is_singular(ext.smax, ext.smin, 20)
    k = kappa_gram(ext.smax, ext.smin)
    assert k > 1e20 and np.isfinite(k)
    json.dumps({"kappa": k}, allow_nan=False)
    assert kappa_gram(1.0, 0.0) == 1e300
    assert kappa_gram(2.0, 0.5) == pytest.approx(16.0)
