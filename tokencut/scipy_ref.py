"""Reference path: the official TokenCut solve with scipy, one image at a time on the CPU.

``ncut_official`` re-implements ``object_discovery.ncut`` + ``detect_box`` of the official code
(github.com/YangtaoWANG95/TokenCut) step by step in numpy/scipy, independently of
``tokencut.ncut``, so the tests can compare the batched torch path against it.
``second_eigvec_scipy`` is the official eigen-solve alone, used by ``--solver scipy``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.linalg import eigh

_POOLS = None


def _one_blas_thread():
    """LAPACK on one thread, as ``tokencut.ncut`` runs torch's solvers (issue 18: a threaded
    solve of these small graphs waits at a barrier per step whenever another process holds a
    core; a scipy solve measured 20 s instead of 25 ms on a loaded 2-core machine). The result
    does not change; ``threadpoolctl`` comes with scikit-learn (a dependency)."""
    global _POOLS
    from threadpoolctl import ThreadpoolController

    if _POOLS is None:  # finding the BLAS libraries takes ~1 ms; limiting then takes ~20 us
        _POOLS = ThreadpoolController()
    return _POOLS.limit(limits=1, user_api="blas")


def _solve(a: np.ndarray) -> tuple[np.ndarray, float]:
    d = np.diag(a.sum(axis=1))
    with _one_blas_thread():
        vals, vecs = eigh(d - a, d, subset_by_index=[1, 2])
    return vecs[:, 0], float(vals[0])


def second_eigvec_scipy(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, N, N)`` graphs -> second-smallest generalised eigenvectors ``(B, N)`` and values,
    via ``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])`` per image (official)."""
    an = a.detach().cpu().double().numpy()
    xs, ls = zip(*(_solve(ai) for ai in an))
    return (
        torch.from_numpy(np.stack(xs)).to(a.device),
        torch.tensor(ls, dtype=torch.float64, device=a.device),
    )


def ncut_official(
    feats: torch.Tensor,
    dims: tuple[int, int],
    patch: int,
    image_hw: tuple[int, int],
    tau: float = 0.2,
    eps: float = 1e-5,
) -> dict:
    """Official TokenCut on one image.

    ``feats``: ``(N, D)`` patch features (cls dropped), ``dims``: ``(h, w)`` patch grid,
    ``image_hw``: original image ``(H, W)``. Returns ``box`` ``[x0, y0, x1, y1]``, ``mask`` (the
    seed's component), ``bipartition``, ``seed``, ``eigvec`` (after the flip), ``eigval``.
    """
    f = F.normalize(feats.float(), p=2).cpu().numpy()
    a = f @ f.T
    a = a > tau
    a = np.where(a.astype(float) == 0, eps, a)
    vec, val = _solve(a)
    eigvec = np.copy(vec)
    bipartition = vec > np.sum(vec) / len(vec)
    seed = int(np.argmax(np.abs(vec)))
    if bipartition[seed] != 1:
        eigvec = eigvec * -1
        bipartition = np.logical_not(bipartition)
    bipartition = bipartition.reshape(dims)

    objects, _ = ndimage.label(bipartition.astype(float))
    cc = objects[np.unravel_index(seed, dims)]
    ys, xs = np.where(objects == cc)
    ymin, ymax = ys.min(), ys.max() + 1
    xmin, xmax = xs.min(), xs.max() + 1
    box = [patch * xmin, patch * ymin, patch * xmax, patch * ymax]
    box[2] = min(box[2], image_hw[1])
    box[3] = min(box[3], image_hw[0])
    return {
        "box": [float(v) for v in box],
        "mask": objects == cc,
        "bipartition": bipartition,
        "seed": seed,
        "eigvec": eigvec.reshape(dims),
        "eigval": val,
    }
