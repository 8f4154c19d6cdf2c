"""Extreme singular values of linear maps: exact (dense) and matrix-free (Krylov).

Pure functions, float64 throughout; no model code here (see ``jacobian.py``).

Exact path
    ``extreme_singular_values(M)``: ``torch.linalg.svdvals`` of the dense matrix (backward
    stable: ``s_min`` is accurate to ``~eps * s_max``, so a numerically singular map shows up as
    ``s_min / s_max ~ 1e-16``), or, with ``gram=True``, ``eigvalsh(M^T M)`` (about 5x faster
    for large square maps, accurate while ``kappa(M)^2 << 1/eps``; below that it can only say
    "singular").

Matrix-free path
    ``golub_kahan_extremes(matvec, rmatvec, ...)``: Golub-Kahan-Lanczos bidiagonalisation with
    full reorthogonalisation on *both* sides, using only ``v -> M v`` (a JVP) and
    ``u -> M^T u`` (a VJP). Working on ``M`` (not ``M^T M``) keeps ``s_min`` accurate for
    ill-conditioned maps. The Ritz values of the bidiagonal are exact bounds in one direction:
    ``smax_ritz <= s_max`` and ``smin_ritz >= s_min`` (Ritz values lie inside the spectrum), so
    an unconverged run *under*-estimates kappa. Each Ritz value carries a residual bound
    ``beta_k |x_k|`` (there is a singular value of ``M`` within it); iterations stop when both
    extreme residuals fall below ``tol * smax_ritz``, at ``max_iter`` or when the Krylov space is
    exhausted (then the result is exact up to rounding).

    ``lanczos_extremes(matvec, dim, ...)``: symmetric Lanczos with full reorthogonalisation for
    the extreme eigenvalues of a symmetric PSD operator, used for ``J J^T`` whose parameter side
    (millions of entries) is too large to store a Krylov basis for.

    The smallest singular value of a map with a dense spectrum converges slowly (Krylov methods
    resolve the ends of the spectrum in proportion to their relative gap); the returned
    ``smin_resid`` / ``lmin_resid`` and ``converged`` say how far to trust it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

EPS64 = torch.finfo(torch.float64).eps
# kappa is reported as a finite float (strict JSON has no Infinity): s_min is clamped at this
# fraction of s_max, so a singular map reads kappa(M M^T) = 1e300 together with singular=True.
SMIN_FLOOR = 1e-150


@dataclass
class Extremes:
    """Extreme singular values of a map ``M`` and how they were obtained."""

    smax: float
    smin: float
    method: str  # "exact" | "iterative"
    iters: int = 0
    converged: bool = True
    smax_resid: float = 0.0  # a singular value of M lies within this of smax (iterative)
    smin_resid: float = 0.0
    singular: bool = False  # numerically rank deficient at this method's precision


def kappa_gram(smax: float, smin: float) -> float:
    """``kappa(M M^T) = (s_max / s_min)^2``, finite (s_min clamped at ``SMIN_FLOOR * s_max``)."""
    if not (smax > 0 and math.isfinite(smax)):
        return 1e300
    if not smin > SMIN_FLOOR * smax:
        return 1e300
    return min((smax / smin) ** 2, 1e300)


def is_singular(smax: float, smin: float, dim: int) -> bool:
    """Numerically rank deficient: ``s_min <= dim * eps * s_max`` (numpy's matrix_rank rule)."""
    return not (smin > dim * EPS64 * smax)


def extreme_singular_values(mat: torch.Tensor, gram: bool = False) -> Extremes:
    """Exact extreme singular values of a dense matrix (computed in float64)."""
    if mat.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(mat.shape)}")
    m = mat.to(torch.float64)
    if gram:
        small = m.T if m.shape[0] > m.shape[1] else m  # Gram on the smaller side
        ev = torch.linalg.eigvalsh(small @ small.T)
        smax = float(ev[-1].clamp_min(0).sqrt())
        smin = float(ev[0].clamp_min(0).sqrt())
        # The Gram squares the spectrum: rounding puts eigenvalues within ~dim*eps*lmax of 0.
        singular = bool(ev[0] <= ev.numel() * EPS64 * ev[-1])
        return Extremes(smax=smax, smin=smin, method="exact", singular=singular)
    s = torch.linalg.svdvals(m)
    smax, smin = float(s[0]), float(s[-1])
    return Extremes(smax, smin, "exact", singular=is_singular(smax, smin, s.numel()))


def _orth(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    # Two passes of classical Gram-Schmidt ("twice is enough") keep the basis orthonormal to
    # machine precision, which is what lets us run past the dimension of well-separated ends.
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def golub_kahan_extremes(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rmatvec: Callable[[torch.Tensor], torch.Tensor],
    n_in: int,
    n_out: int,
    *,
    max_iter: int = 300,
    tol: float = 1e-8,
    check_every: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int, float, float], None] | None = None,
) -> Extremes:
    """Extreme singular values of ``M`` (``n_out x n_in``) from products ``M v`` and ``M^T u``.

    ``matvec``/``rmatvec`` take and return 1-D float64 tensors. ``s_min`` is the smallest
    singular value among the first ``n_in`` (for ``n_out < n_in`` the trivial zeros of the
    null space are what Krylov finds: pass the wide map transposed).
    """
    k_max = min(max_iter, n_in, n_out)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(n_in, generator=gen, dtype=torch.float64).to(device)
    v = v / v.norm()
    vs = torch.empty(k_max + 1, n_in, dtype=torch.float64, device=device)
    us = torch.empty(k_max, n_out, dtype=torch.float64, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    vs[0] = v
    u = matvec(v)
    res = Extremes(smax=0.0, smin=0.0, method="iterative", converged=False)
    for j in range(k_max):
        if j > 0:
            u = matvec(vs[j]) - betas[-1] * us[j - 1]
            u = _orth(u, us[:j])
        a = float(u.norm())
        if a <= EPS64 * (alphas[0] if alphas else 1.0):
            # M v_j in span(U): exact breakdown, the Krylov space holds a singular value 0.
            alphas.append(0.0)
            res = _ritz_bidiag(alphas, betas, 0.0, j + 1, True)
            break
        alphas.append(a)
        us[j] = u / a
        w = rmatvec(us[j]) - a * vs[j]
        w = _orth(w, vs[: j + 1])
        b = float(w.norm())
        # complete: the Krylov space is invariant, the Ritz values are singular values of M
        complete = j + 1 == n_in or b <= EPS64 * max(alphas) * 10
        exhausted = complete or j + 1 == k_max
        if not exhausted:
            vs[j + 1] = w / b
        if exhausted or (j + 1) % check_every == 0:
            res = _ritz_bidiag(alphas, betas + [b], b, j + 1, complete)
            if progress is not None:
                progress(j + 1, res.smax, res.smin)
            if complete:
                break
            if res.smax_resid <= tol * res.smax and res.smin_resid <= tol * res.smax:
                res.converged = True
                break
            if exhausted:
                break
        betas.append(b)
    res.singular = is_singular(res.smax, res.smin, n_in)
    return res


def _ritz_bidiag(
    alphas: list[float], betas: list[float], b_last: float, k: int, complete: bool
) -> Extremes:
    # Upper bidiagonal B_k: diag alphas, superdiag betas[:k-1]; M V_k = U_k B_k and
    # M^T U_k = V_k B_k^T + b_last v_{k+1} e_k^T, so a Ritz triple (s, x, y) of B_k has residual
    # b_last * |x_k| in the augmented symmetric problem.
    bmat = torch.diag(torch.tensor(alphas[:k], dtype=torch.float64))
    if k > 1:
        bmat += torch.diag(torch.tensor(betas[: k - 1], dtype=torch.float64), 1)
    uu, ss, _ = torch.linalg.svd(bmat)
    resid = b_last * uu[-1].abs()  # last row of left singular vectors
    return Extremes(
        smax=float(ss[0]),
        smin=float(ss[-1]),
        method="iterative",
        iters=k,
        converged=complete,
        smax_resid=float(resid[0]),
        smin_resid=float(resid[-1]),
    )


@dataclass
class EigExtremes:
    """Extreme eigenvalues of a symmetric PSD operator (Lanczos)."""

    lmax: float
    lmin: float
    iters: int
    converged: bool
    lmax_resid: float
    lmin_resid: float


def lanczos_extremes(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    *,
    max_iter: int = 300,
    tol: float = 1e-8,
    check_every: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int, float, float], None] | None = None,
) -> EigExtremes:
    """Extreme eigenvalues of a symmetric operator (full reorthogonalisation, float64).

    Ritz values are inner bounds (``lmax_ritz <= lmax``, ``lmin_ritz >= lmin``); each comes with
    the residual bound ``beta_k |s_k|`` (an eigenvalue lies within it).
    """
    k_max = min(max_iter, dim)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=torch.float64).to(device)
    qs = torch.empty(k_max + 1, dim, dtype=torch.float64, device=device)
    qs[0] = q / q.norm()
    alphas: list[float] = []
    betas: list[float] = []
    out = EigExtremes(0.0, 0.0, 0, False, math.inf, math.inf)
    for j in range(k_max):
        w = matvec(qs[j])
        a = float(qs[j] @ w)
        alphas.append(a)
        w = _orth(w, qs[: j + 1])
        b = float(w.norm())
        exhausted = j + 1 == k_max or b <= EPS64 * max(abs(x) for x in alphas) * 10
        if exhausted or (j + 1) % check_every == 0:
            t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if j > 0:
                off = torch.tensor(betas, dtype=torch.float64)
                t += torch.diag(off, 1) + torch.diag(off, -1)
            ev, vec = torch.linalg.eigh(t)
            resid = b * vec[-1].abs()
            out = EigExtremes(
                lmax=float(ev[-1]),
                lmin=float(ev[0]),
                iters=j + 1,
                converged=False,
                lmax_resid=float(resid[-1]),
                lmin_resid=float(resid[0]),
            )
            if progress is not None:
                progress(j + 1, out.lmax, out.lmin)
            tiny = b <= EPS64 * max(abs(x) for x in alphas) * 10
            if (j + 1 == dim) or tiny:
                out.converged = True
                break
            if out.lmax_resid <= tol * out.lmax and out.lmin_resid <= tol * out.lmax:
                out.converged = True
                break
            if exhausted:
                break
        betas.append(b)
        qs[j + 1] = w / b
    return out
