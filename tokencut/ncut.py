"""TokenCut (Wang et al., TPAMI 2023) as pure functions, batched in torch.

The algorithm follows the official code (github.com/YangtaoWANG95/TokenCut, ``object_discovery.py``,
itself adapted from LOST): patch features (cls dropped) are L2-normalised, the cosine affinity is
binarised (``> tau -> 1``, else ``eps``), and the second-smallest generalised eigenvector of
``(D - A) x = lambda D x`` is split at its mean. The side holding ``argmax |x|`` (the seed) is the
foreground; the box is the extent of the 4-connected foreground component containing the seed,
times the patch size, clipped to the original (unpadded) image.

The official code calls ``scipy.linalg.eigh(D - A, D)`` per image on the CPU. Here the
generalised problem is reduced to the symmetric standard problem of the normalised Laplacian,
``L = I - D^-1/2 A D^-1/2``, ``L y = lambda y``, ``x = D^-1/2 y`` (same eigenvalues; ``x`` has
``x^T D x = 1`` like scipy's). Its smallest pair is known (``0``, ``sqrt(d)``), so the default
solver (``"torch"``, ``second_eigvec_lanczos``) finds the wanted second pair by Lanczos on the
complement of ``sqrt(d)``: a few tens of matrix-vector products instead of a dense ``O(N^3)``
solve, with the dense ``torch.linalg.eigh`` (``"dense"``, ``second_eigvec_torch``) as fallback
when it does not converge to tolerance. ``tokencut.scipy_ref`` keeps the official path.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dino_skipless.ranges import Range

from .scipy_ref import second_eigvec_scipy

SOLVERS = ("torch", "dense", "lobpcg", "scipy")
TAU_RANGE = Range(ge=-1, lt=1)  # a cosine; tau = 1 leaves no edge (every graph degenerate)
EPS_RANGE = Range(gt=0, lt=1)  # > 0 keeps the graph connected, < 1 below an edge's weight
SEED_RTOL = 1e-8  # |x| values this close to the max count as ties for the seed (see below)
SPLIT_RTOL = 1e-8  # x values this close to the mean (relative to max |x|) are ties: background


@dataclass(frozen=True)
class TokenCutConfig:
    """Published TokenCut defaults (official ``main_tokencut.py`` argparse defaults).

    - ``tau=0.2``: ``--tau`` (affinity threshold), ``eps=1e-5``: ``--eps`` (weight of the
      non-edges, which keeps the graph connected), ``feature='k'``: ``--which_features`` (keys of
      the last block's attention, heads concatenated), ``layer=-1``: the official code hooks
      ``blocks[-1]``; ``no_hard=False``: ``--no_hard`` off (every VOC box is ground truth);
      ``binary_graph=True``: ``--no-binary-graph`` off; ``iou_threshold=0.5``: CorLoc's criterion.
    - The patch size is always the model's own (official: ``--patch_size``, default 16).
    - ``solver``/``eig_dtype`` are ours (``SOLVERS``: ``torch`` = Lanczos with a dense fallback,
      ``dense`` = full ``torch.linalg.eigh``, ``lobpcg``, ``scipy`` = the official solve); the
      torch solvers run in float64 by default so that they match scipy's float64 LAPACK solve
      (the bipartition is a threshold of the eigenvector, so precision matters only near ties).
    - ``min_grid=2``: an image needs at least 2 patch rows and 2 patch columns (after padding);
      smaller images are skipped and counted (ours; the official code has no such case on VOC).
    """

    tau: float = 0.2
    eps: float = 1e-5
    feature: str = "k"
    layer: int = -1
    no_hard: bool = False
    binary_graph: bool = True
    iou_threshold: float = 0.5
    solver: str = "torch"
    eig_dtype: torch.dtype = field(default=torch.float64)
    min_grid: int = 2


@dataclass
class NCutResult:
    """TokenCut's output for one image (all arrays on the CPU, numpy)."""

    box: list[float]  # [x0, y0, x1, y1] in original-image pixels (continuous coordinates)
    mask: np.ndarray  # (h, w) bool: the seed's connected component (the discovered object)
    bipartition: np.ndarray  # (h, w) bool: foreground side of the cut, after the flip rule
    seed: int  # flat patch index of argmax |eigenvector|
    eigvec: (
        np.ndarray
    )  # (h, w) second-smallest generalised eigenvector, sign-flipped like the official code
    eigval: float
    degenerate: bool = (
        False  # affinity with no structure (all entries equal): whole image predicted
    )
    fallback: bool = False  # solver "torch": Lanczos did not converge, dense eigh used instead


def affinity(
    feats: torch.Tensor,
    tau: float = 0.2,
    eps: float = 1e-5,
    binary: bool = True,
    out_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``(B, N, D)`` patch features -> ``(B, N, N)`` TokenCut graph.

    Cosine similarity of L2-normalised features; binary: ``> tau -> 1`` else ``eps`` (official
    default); non-binary (the official ``--no-binary-graph`` ablation): similarities ``< tau``
    replaced by ``eps``, the rest kept.

    The similarity is computed in float32 and compared with ``tau`` there (as the official code
    does); the binary graph is returned in ``out_dtype`` so that ``eps`` is exactly 1e-5.
    """
    if feats.dim() != 3:
        raise ValueError(f"expected features of shape (B, N, D), got {tuple(feats.shape)}")
    f = F.normalize(feats.float(), p=2, dim=-1)
    a = f @ f.transpose(1, 2)
    if binary:
        one = torch.ones((), dtype=out_dtype, device=a.device)
        return torch.where(a > tau, one, torch.full_like(one, eps))
    return torch.where(a < tau, torch.full_like(a, eps), a).to(out_dtype)


def is_degenerate(a: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """``(B,)`` bool: graphs whose edge weights (off the diagonal) are all equal.

    With the binary graph this happens whenever *every* pair of patches has cosine > tau (or none
    has): identical features, but also the near-collinear tokens of a rank-collapsed network
    (e.g. the last block of a randomly initialised skipless ViT).

    Such a graph is uniform: ``D - A = w (N I - 1 1^T)`` has the eigenvalue ``N w``
    with multiplicity ``N - 1``, so "the" second eigenvector is arbitrary and any cut would be
    noise. The caller predicts the whole image instead (documented in ``tokencut_batch``).
    """
    # Self-loops do not shape the cut (D - A ignores the diagonal): compare pairs only. The
    # off-diagonal entries, as a view: drop the first flat entry, and each row of N + 1 then
    # ends with a diagonal entry.
    n = a.shape[-1]
    off = a.reshape(*a.shape[:-2], n * n)[..., 1:].unflatten(-1, (n - 1, n + 1))[..., :n]
    hi, lo = off.amax(dim=(-1, -2)), off.amin(dim=(-1, -2))  # (flattening would copy)
    return (hi - lo) <= rtol * hi.abs().clamp_min(1e-30)


def second_eigvec_torch(
    a: torch.Tensor, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-smallest solution of ``(D - A) x = lambda D x`` for a batch ``(B, N, N)``.

    Returns ``(x (B, N), lambda (B,))`` with ``x^T D x = 1`` (scipy's normalisation; sign
    arbitrary, fixed later by the seed rule).
    """
    a = a.to(dtype)
    d = a.sum(-1)
    dis = d.rsqrt()
    m = dis.unsqueeze(-1) * a * dis.unsqueeze(-2)
    lap = torch.eye(a.shape[-1], dtype=dtype, device=a.device) - m
    lap = 0.5 * (lap + lap.transpose(-1, -2))  # exact symmetry for eigh
    with _one_cpu_thread(lap.device):
        vals, vecs = torch.linalg.eigh(lap)
    return dis * vecs[..., 1], vals[..., 1]


LANCZOS_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # residual ||M y - theta y||, ||M|| = 1
LANCZOS_VEC_TOL = {torch.float64: 1e-9, torch.float32: 1e-3}  # eigenvector error bound r / gap
LANCZOS_MIN_N = 16  # smaller graphs: dense eigh (as cheap, and the Krylov space would be all)


def second_eigvec_lanczos(
    a: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    max_steps: int = 80,
    check_every: int = 2,
    tol: float | None = None,
    vec_tol: float | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``second_eigvec_torch`` by Lanczos, with a dense fallback; returns ``(x, lambda, fallback)``.

    Only the second-smallest pair of ``(D - A) x = lambda D x`` is wanted. With
    ``M = D^-1/2 A D^-1/2`` (eigenvalues ``1 - lambda``) the smallest pair is known exactly:
    ``lambda = 0``, ``y ~ sqrt(d)``, so the wanted pair is the *largest* eigenpair of ``M`` on the
    complement of ``sqrt(d)``. Lanczos from a fixed random start, with every new vector
    orthogonalised (twice) against ``sqrt(d)`` and all previous ones, finds it in 10-30
    matrix-vector products instead of the ``O(N^3)`` dense solve (graphs one at a time, see
    ``_lanczos_one``; the result does not depend on the batch).

    A graph is accepted when the Ritz pair's residual ``r = ||M y - theta y||`` (recomputed
    explicitly at the end, not only the Lanczos estimate) is below ``tol`` and the eigenvector's
    error bound ``r / gap`` (``gap``: distance to the next Ritz value) is below ``vec_tol``.
    Graphs that fail (a near-degenerate eigengap, no convergence in ``max_steps``, a breakdown
    that leaves the wanted pair ambiguous, any non-finite number) are re-solved by the dense
    ``second_eigvec_torch`` and flagged in ``fallback``; this function never raises on a
    finite graph. Graphs with fewer than ``LANCZOS_MIN_N`` nodes go to the dense solver directly
    (not flagged). An exactly repeated second eigenvalue (a symmetric graph) leaves the
    eigenvector undetermined for every solver, scipy's included; Lanczos detects it after a
    breakdown (``_lanczos_one``) and hands such graphs to the dense solver, so that the torch
    solver's box is always the dense solver's there.
    """
    a = a.to(dtype)
    b, n, _ = a.shape
    dev = a.device
    tol = LANCZOS_TOL.get(dtype, 1e-5) if tol is None else tol
    vec_tol = LANCZOS_VEC_TOL.get(dtype, 1e-3) if vec_tol is None else vec_tol
    if n < LANCZOS_MIN_N or b == 0:
        x, lam = second_eigvec_torch(a, dtype)
        return x, lam, torch.zeros(b, dtype=torch.bool, device=dev)
    x = torch.empty(b, n, dtype=dtype, device=dev)
    lam = torch.empty(b, dtype=dtype, device=dev)
    ok = torch.zeros(b, dtype=torch.bool, device=dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # The same start (and restart) for every graph: a result does not depend on its batch.
    starts = torch.randn(2, n, generator=gen, dtype=torch.float64).to(dev, dtype)
    with _one_cpu_thread(dev):
        for i in range(b):
            try:
                x[i], lam[i], ok[i] = _lanczos_one(
                    a[i], starts, max_steps, check_every, tol, vec_tol
                )
            except torch.linalg.LinAlgError:  # a safety net: the dense solve decides
                ok[i] = False
    fallback = ~ok
    if bool(fallback.any()):
        idx = fallback.nonzero().squeeze(-1)
        x[idx], lam[idx] = second_eigvec_torch(a[idx], dtype)
    return x, lam, fallback


def _lanczos_one(a, starts, max_steps, check_every, tol, vec_tol):
    """One graph ``a (N, N)``: ``(x, lambda, accepted)`` (see ``second_eigvec_lanczos``).

    Graphs are solved one at a time, with 2-d ops: a CPU ``bmm`` of a batch of matrix-vector
    products is ~10x slower per graph than one ``mv`` (no BLAS gemv path: 0.7 ms vs 0.05 ms
    measured at N = 504), and the small ops' dispatch cost, not the arithmetic, is what a step
    costs at these sizes.

    A *breakdown* (the new vector's norm ``beta`` below ``tol``: the Krylov space is invariant,
    as for graphs made of a few groups of identical patches) gives exact eigenvalues but is blind
    to their multiplicity: one start vector sees one direction of each eigenspace. So the
    iteration goes on into a second Krylov block, from the normalised round-off when there is
    any, else (``beta`` at round-off level, or NaN after a division by zero) from a second
    fixed random vector with ``beta = 0`` (every vector is orthogonal to all before it, so the
    projected matrix stays tridiagonal), and stops at the second breakdown; convergence is not
    tested in between. A repeated top eigenvalue then shows as two equal Ritz values, a zero
    gap, and the graph is not accepted.
    """
    n = a.shape[-1]
    m = max(2, min(max_steps, n - 1))  # Krylov dimension on the (n - 1)-dim complement
    d = a.sum(-1)
    dis = d.rsqrt()
    # M q = dis * (A (dis * q)): M itself is never formed (a fresh N x N tensor costs more, in
    # page faults, than the two vector products per step).
    # Basis rows: 0 is the known top eigenvector sqrt(d), 1..m the Lanczos vectors.
    q = torch.empty(m + 1, n, dtype=a.dtype, device=a.device)
    q[0] = d.sqrt() / d.sum().sqrt()
    q[1] = _orth(_orth(starts[0], q[:1]), q[:1])
    alphas, betas = [], []
    breakdowns = 0
    zero = 100 * torch.finfo(a.dtype).eps  # a new vector this short is round-off: restart
    for j in range(1, m + 1):
        basis = q[: j + 1]
        w = dis * torch.mv(a, dis * q[j])
        h = torch.mv(basis, w)  # projections on the whole basis (full reorthogonalisation)
        w = torch.addmv(w, basis.T, h, alpha=-1)
        nb = torch.linalg.vector_norm(w)
        restart = not bool(nb > zero)  # also NaN
        if restart:
            nb = torch.zeros_like(nb)
        alphas.append(h[j])
        betas.append(nb)
        if bool(nb <= tol):  # (near-)invariant subspace: see the docstring
            breakdowns += 1
            if breakdowns == 2:
                break
        if j < m:
            # Second pass ("twice is enough") on the normalised vector; after an exact
            # breakdown the fixed restart vector, orthogonal to the whole basis.
            nxt = _orth(starts[1], basis) if restart else w / nb
            q[j + 1] = _orth(nxt, basis)
        if breakdowns == 0 and j >= 6 and j % check_every == 0:
            theta, s = _ritz(torch.stack(alphas), torch.stack(betas))
            est = (nb * s[-1, -1]).abs()  # Lanczos residual estimate of the top pair
            gap = theta[-1] - theta[-2]
            if bool((est <= 0.5 * tol) & (est <= 0.5 * vec_tol * gap)):
                break
    k = len(alphas)
    theta, s = _ritz(torch.stack(alphas), torch.stack(betas))
    gap = theta[-1] - theta[-2] if k > 1 else torch.ones((), dtype=a.dtype, device=a.device)
    y = torch.mv(q[1 : k + 1].T, s[:, -1])
    y = y / torch.linalg.vector_norm(y)
    my = dis * torch.mv(a, dis * y)
    th = torch.dot(y, my)
    res = torch.linalg.vector_norm(my - th * y)  # explicit, not the estimate
    accepted = (res <= tol) & (res <= vec_tol * gap) & torch.isfinite(res)
    return dis * y, 1.0 - th, accepted


def _orth(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``v (N,)`` made orthogonal to the orthonormal rows of ``basis (K, N)``, unit norm."""
    v = torch.addmv(v, basis.T, torch.mv(basis, v), alpha=-1)
    return v / torch.linalg.vector_norm(v)


def _ritz(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs (ascending) of the Lanczos tridiagonal: ``alpha (k,)`` on the diagonal,
    ``beta[:k - 1]`` beside it."""
    off = beta[:-1]
    return torch.linalg.eigh(torch.diag(alpha) + torch.diag(off, 1) + torch.diag(off, -1))


@contextmanager
def _one_cpu_thread(device: torch.device):
    """LAPACK's eigh of a graph of a few hundred tokens synchronises its threads at every
    Householder step; when another process holds a core, each barrier waits for a time slice,
    and a 100 x 100 solve measured 1 ms to 34 s (issue 18). One thread has no barriers and
    loses little: the matrices are small."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def second_eigvec_lobpcg(
    a: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    tol: float | None = None,
    niter: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as ``second_eigvec_torch`` with LOBPCG (two extreme eigenpairs only; for large grids).

    Works on ``M = D^-1/2 A D^-1/2`` (eigenvalues ``1 - lambda``) and asks LOBPCG for its two
    largest pairs, starting from the known top eigenvector ``sqrt(d)``. LOBPCG needs
    ``N >= 3 k = 6`` (smaller graphs use the dense solver). Images are solved one by one
    (``torch.lobpcg`` has no batch dimension).
    """
    a = a.to(dtype)
    b, n, _ = a.shape
    if tol is None:  # residual tolerance reachable in the working precision
        tol = 1e-9 if dtype == torch.float64 else 1e-4
    if n < 6:
        return second_eigvec_torch(a, dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    xs, ls = [], []
    for i in range(b):
        d = a[i].sum(-1)
        dis = d.rsqrt()
        m = dis.unsqueeze(-1) * a[i] * dis.unsqueeze(0)
        m = 0.5 * (m + m.T)
        # A block larger than k (up to 8 vectors) converges in far fewer iterations.
        x0 = torch.randn(n, min(8, n // 3), generator=gen, dtype=dtype).to(a.device)
        x0[:, 0] = d.sqrt()  # the exact top eigenvector as a start
        vals, vecs = torch.lobpcg(m, k=2, X=x0, largest=True, tol=tol, niter=niter)
        order = torch.argsort(vals, descending=True)
        xs.append(dis * vecs[:, order[1]])
        ls.append(1.0 - vals[order[1]])
    return torch.stack(xs), torch.stack(ls)


def seed_and_bipartition(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Official split and flip rule for ``(B, N)`` eigenvectors.

    ``bip = x > mean(x)``; ``seed = argmax |x|`` (first of near-ties); if the seed is not in
    ``bip`` the eigenvector is negated and ``bip`` replaced by its complement. Returns
    ``(bip, seed, x_flipped)``.

    Ties with the mean (within ``SPLIT_RTOL * max|x|``) are background whatever the sign. The
    official code's ``logical_not`` puts entries *equal* to the mean into the foreground when it
    flips and into the background when it does not; since an eigenvector's sign is arbitrary,
    that made the box a matter of the solver's sign and round-off on graphs where many patches
    sit at the mean (e.g. one large group of identical patches and two symmetric outliers).
    """
    avg = x.mean(-1, keepdim=True)
    mag = x.abs()
    # Binarised graphs make exact ties in |x| common (patches with identical neighbourhoods have
    # identical entries); np.argmax takes the first of exact ties, but round-off decides which
    # of them comes out largest. Treating values within SEED_RTOL of the max as ties and taking
    # the first makes the seed independent of the solver's round-off.
    top = mag.amax(-1, keepdim=True)
    n = x.shape[-1]
    idx = torch.arange(n, device=x.device).expand_as(x)
    seed = torch.where(mag >= top * (1 - SEED_RTOL), idx, n).amin(-1, keepdim=True)
    in_fg = x.gather(-1, seed) > avg  # else the official code flips the sign
    x = torch.where(in_fg, x, -x)
    bip = (x - torch.where(in_fg, avg, -avg)) > SPLIT_RTOL * top
    bip = bip.scatter(-1, seed, True)  # the seed is foreground even if it sits at a tie
    return bip, seed.squeeze(-1), x


def seed_component(bipartition: np.ndarray, seed: int) -> np.ndarray:
    """``(h, w)`` bool: the 4-connected component of ``bipartition`` that contains ``seed``.

    ``scipy.ndimage.label``'s default structuring element is the 4-neighbourhood cross, as used
    by the official ``detect_box``.
    """
    labels, _ = ndimage.label(bipartition)
    lab = labels.flat[seed]
    if lab == 0:
        raise ValueError("the seed patch is not in the bipartition (flip rule not applied?)")
    return labels == lab


def component_box(mask: np.ndarray, patch: int, image_hw: tuple[int, int]) -> list[float]:
    """Extent of ``mask`` (patch grid) in pixels, ``[x0, y0, x1, y1]``, clipped to the image.

    ``x1 = (xmax + 1) * patch`` (exclusive end); only x1/y1 can exceed the image (padding), so
    only they are clipped, as in the official code.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("empty component")
    h, w = image_hw
    x0, y0 = int(xs.min()) * patch, int(ys.min()) * patch
    x1, y1 = (int(xs.max()) + 1) * patch, (int(ys.max()) + 1) * patch
    return [float(x0), float(y0), float(min(x1, w)), float(min(y1, h))]


def tokencut_batch(
    feats: torch.Tensor,
    grid: tuple[int, int],
    patch: int,
    image_sizes: list[tuple[int, int]],
    cfg: TokenCutConfig = TokenCutConfig(),
) -> list[NCutResult]:
    """TokenCut on a batch of images sharing one patch grid.

    ``feats``: ``(B, h*w, D)`` patch features (cls already dropped); ``image_sizes``: the original
    ``(H, W)`` of each image (before padding), used to clip the boxes.

    Degenerate graphs (all weights equal, see ``is_degenerate``) get the whole image as box and
    mask, flagged ``degenerate=True``; they still count in CorLoc (the method found no object).
    """
    h, w = grid
    b, n, _ = feats.shape
    if n != h * w:
        raise ValueError(f"{n} patch features do not fill a {h}x{w} grid")
    if len(image_sizes) != b:
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {b}")
    if n < 2:
        raise ValueError("TokenCut needs at least 2 patches")
    if cfg.solver not in _SOLVE:
        raise ValueError(f"unknown solver {cfg.solver!r}; expected one of {SOLVERS}")
    # One CPU thread for the whole step, not only the solve: the elementwise passes over the
    # N x N graph are split over threads too, and on a loaded machine each split waits for a
    # time slice (issue 18: this step took 45 ms/image next to a 4 ms solve).
    with _one_cpu_thread(feats.device):
        return _tokencut_batch(feats, grid, patch, image_sizes, cfg)


def _tokencut_batch(feats, grid, patch, image_sizes, cfg) -> list[NCutResult]:
    h, w = grid
    b = feats.shape[0]
    dtype = torch.float64 if cfg.solver == "scipy" else cfg.eig_dtype
    a = affinity(feats, cfg.tau, cfg.eps, cfg.binary_graph, out_dtype=dtype)
    # A NaN feature (a diverged model) leaves NaN weights in the non-binary graph: no cut can be
    # read from it either, so it is predicted like a degenerate one instead of failing.
    degen = is_degenerate(a) | ~torch.isfinite(a).flatten(1).all(1)
    keep = (~degen).nonzero().squeeze(-1)
    out: list[NCutResult | None] = [None] * b
    if len(keep):
        # Degenerate graphs are left out of the solve (their eigenproblem has no answer).
        x, lam, fb = second_eigvec(a if len(keep) == b else a[keep], cfg.solver, dtype)
        bip, seed, x = seed_and_bipartition(x)
        bip, seed, x, lam, fb = (t.cpu().numpy() for t in (bip, seed, x, lam, fb))
        for j, i in enumerate(keep.tolist()):
            bp = bip[j].reshape(h, w)
            comp = seed_component(bp, int(seed[j]))
            box = component_box(comp, patch, image_sizes[i])
            out[i] = NCutResult(
                box, comp, bp, int(seed[j]), x[j].reshape(h, w), float(lam[j]), fallback=bool(fb[j])
            )
    for i in degen.nonzero().squeeze(-1).tolist():
        hh, ww = image_sizes[i]
        full = np.ones((h, w), bool)
        box = [0.0, 0.0, float(ww), float(hh)]
        out[i] = NCutResult(box, full, full, 0, np.zeros((h, w)), 0.0, degenerate=True)
    return out


def second_eigvec(
    a: torch.Tensor, solver: str = "torch", dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eigen-solve alone, by name (``SOLVERS``): ``(B, N, N)`` graphs (none degenerate) ->
    ``(x (B, N), lambda (B,), fallback (B,) bool)``; ``fallback`` marks the graphs that the
    ``torch`` solver handed to the dense solver (always False for the others)."""
    solve = _SOLVE.get(solver)
    if solve is None:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    return solve(a, dtype)


def _no_fallback(solve):
    def run(a: torch.Tensor, dtype: torch.dtype):
        x, lam = solve(a, dtype)
        return x, lam, torch.zeros(len(x), dtype=torch.bool, device=x.device)

    return run


def _solve_scipy(a: torch.Tensor, dtype: torch.dtype):
    """The official per-image CPU solve. Should LAPACK refuse a graph (it has not on any fuzzed
    map, but ``eigh`` of a pencil may fail to converge), that graph is solved densely and
    flagged as a fallback instead of ending the run."""
    xs, ls, fb = [], [], []
    for ai in a:
        try:
            x, lam = second_eigvec_scipy(ai[None])
            fb.append(False)
        except (np.linalg.LinAlgError, ValueError):
            x, lam = second_eigvec_torch(ai[None], torch.float64)
            fb.append(True)
        xs.append(x[0])
        ls.append(lam[0])
    return torch.stack(xs), torch.stack(ls), torch.tensor(fb, dtype=torch.bool, device=a.device)


_SOLVE = {  # each returns (x (B, N), lambda (B,), fallback (B,) bool)
    "torch": second_eigvec_lanczos,
    "dense": _no_fallback(second_eigvec_torch),
    "lobpcg": _no_fallback(second_eigvec_lobpcg),
    "scipy": _solve_scipy,
}
