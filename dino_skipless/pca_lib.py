"""PCA-RGB pictures of patch features (paper Sec. 6.3 / App. A.5, Figs. 4, 7, 8): pure functions.

Conventions (the figure's meaning depends on them, so they are fixed and documented here):

* **Fit set.** PCA is fitted per (model, block) -- never across models, whose feature spaces are
  unrelated -- over the patch tokens of *all* shown images (``fit='joint'``, the default: one
  colour code per column, so the same colour means the same direction in every row), or over one
  image's patches at a time (``fit='per-image'``).
* **Solver.** Exact, deterministic SVD (LAPACK, float64) of the centred features; no randomised
  solver, so the same inputs give the same colours.
* **Sign.** An eigenvector's sign is arbitrary; we flip each principal axis so that its
  largest-magnitude loading is positive (first such entry on ties). This is scikit-learn's
  convention since 1.5 (``svd_flip(u_based_decision=False)``).
* **Colours.** Component ``k`` -> channel ``k`` (R, G, B = PC1, PC2, PC3), each min-max scaled to
  [0, 1] over the fit set (all shown patches when joint, the image's own patches per-image). A
  component with zero range maps to 0 (scikit-learn's ``MinMaxScaler`` does the same).
* **Background mask** (DINOv2, Oquab et al. 2023, Sec. 7 "patch features": threshold the first
  component, keep the patches on one side, and compute a second PCA on the kept patches only).
  PC1 scores are centred (the fit set's mean scores 0); the threshold (default 0, i.e. DINOv2's
  "positive value") is in those units. Which side is the foreground is decided by the data, not
  by the solver's sign: PC1 is oriented so that the image-border patches score negative on
  average (objects rarely fill the border; background does), and the foreground is ``score >
  threshold``. Background patches are painted ``background`` (black by default); the colours of
  the foreground come from a PCA fitted on foreground patches only.
* **Upsampling** to the image size: nearest by default -- one flat colour per patch shows what
  the features resolve and invents no detail; bilinear is offered for smoother pictures.
* **Input images** are resized so the short side equals the resolution (bicubic, antialiased) and
  centre-cropped to a square, so every row has the same shape and the patch grid aligns with the
  picture shown in the first column.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

FIT_MODES = ("joint", "per-image")
UPSAMPLE_MODES = ("nearest", "bilinear")


@dataclass(frozen=True)
class PCAConfig:
    """How feature maps become colours (see the module docstring for why)."""

    n_components: int = 3  # RGB
    fit: str = "joint"  # 'joint' over all shown images | 'per-image'
    mask_background: bool = False
    # DINOv2 keeps patches with a positive first component: threshold 0 on the centred score.
    mask_threshold: float = 0.0
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)  # colour of masked patches
    upsample: str = "nearest"

    def __post_init__(self):
        if self.fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {FIT_MODES}, got {self.fit!r}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}")


@dataclass
class PCAFit:
    mean: torch.Tensor  # (D,) float64
    components: torch.Tensor  # (k, D) float64, rows orthonormal (zero rows if rank < k)
    explained_variance: torch.Tensor  # (k,)
    explained_variance_ratio: torch.Tensor  # (k,)


@dataclass
class PCARGB:
    rgb: np.ndarray  # (B, h, w, 3) float32 in [0, 1], patch resolution
    foreground: np.ndarray | None  # (B, h, w) bool when masking, else None
    explained_variance_ratio: list[list[float]]  # one list per fit (1 if joint, B if per-image)


@contextmanager
def single_thread() -> Iterator[None]:
    # Measured on a 2-core box: LAPACK's threaded SVD right after a model forward ran 3-8 s
    # (thread-pool contention) vs 0.2 s single-threaded for 1960 x 384; these fits are small.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def fit_pca(x: torch.Tensor | np.ndarray, n_components: int = 3) -> PCAFit:
    """Exact PCA of the rows of ``x`` (N, D) with the largest-|loading|-positive sign convention.

    If the data have fewer than ``n_components`` directions (N - 1 or D smaller), the missing
    components are zero rows, so their scores are constant and map to 0.
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"fit_pca expects a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    with single_thread():
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    var = s**2 / max(n - 1, 1)
    total = var.sum()
    k = min(n_components, vh.shape[0])
    comps = vh[:k].clone()
    idx = comps.abs().argmax(1)  # first maximum on ties
    signs = torch.sign(comps[torch.arange(k), idx])
    signs[signs == 0] = 1.0
    comps *= signs[:, None]
    ev = var[:k].clone()
    if k < n_components:
        comps = torch.cat([comps, comps.new_zeros(n_components - k, d)])
        ev = torch.cat([ev, ev.new_zeros(n_components - k)])
    ratio = ev / total if total > 0 else torch.zeros_like(ev)
    return PCAFit(mean, comps, ev, ratio)


def project(x: torch.Tensor | np.ndarray, fit: PCAFit) -> torch.Tensor:
    """Centred scores ``(x - mean) @ components.T`` (N, k), float64."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    return (x - fit.mean) @ fit.components.T


def minmax(scores: torch.Tensor) -> torch.Tensor:
    """Scale each column to [0, 1] over the rows; zero-range columns become 0."""
    lo = scores.min(0).values
    hi = scores.max(0).values
    rng = hi - lo
    out = (scores - lo) / torch.where(rng > 0, rng, torch.ones_like(rng))
    return out.clamp_(0.0, 1.0)


def pca_colours(x: torch.Tensor | np.ndarray, n_components: int = 3) -> tuple[torch.Tensor, PCAFit]:
    """Rows of ``x`` (N, D) -> colours (N, k) in [0, 1]: fit, project, min-max per component."""
    fit = fit_pca(x, n_components)
    return minmax(project(x, fit)), fit


def border_mask(batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """(batch * h * w,) bool: patches on the outer ring of each image's patch grid."""
    h, w = grid
    m = torch.zeros(h, w, dtype=torch.bool)
    m[0], m[-1], m[:, 0], m[:, -1] = True, True, True, True
    return m.flatten().repeat(batch)


def foreground_mask(
    x: torch.Tensor | np.ndarray, batch: int, grid: tuple[int, int], threshold: float = 0.0
) -> torch.Tensor:
    """DINOv2-style foreground of rows ``x`` (batch * h * w, D), fitted over all given rows.

    PC1 is oriented so that the border patches' mean score is <= 0 (the fit set's mean is 0);
    the foreground is ``score > threshold``.
    """
    fit = fit_pca(x, 1)
    score = project(x, fit)[:, 0]
    if score[border_mask(batch, grid)].mean() > 0:
        score = -score
    return score > threshold


def pca_rgb(
    patches: torch.Tensor | np.ndarray, grid: tuple[int, int], cfg: PCAConfig = PCAConfig()
) -> PCARGB:
    """Patch features (B, h*w, D) of one (model, block) -> RGB maps (B, h, w, 3) at patch scale."""
    x = torch.as_tensor(patches).detach().to("cpu", torch.float64)
    b, n, d = x.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} patches per image do not form the {h}x{w} grid")
    k = cfg.n_components
    groups = [x.reshape(b * n, d)] if cfg.fit == "joint" else [x[i] for i in range(b)]
    rgb, fg, ratios = [], [], []
    for g in groups:
        nb = g.shape[0] // n
        if cfg.mask_background:
            keep = foreground_mask(g, nb, grid, cfg.mask_threshold)
            col = torch.tensor(cfg.background, dtype=torch.float64)[:k].expand(g.shape[0], k)
            col = col.clone()
            if keep.any():
                c, fit = pca_colours(g[keep], k)
                col[keep] = c
                ratios.append(fit.explained_variance_ratio.tolist())
            else:
                ratios.append([0.0] * k)
            fg.append(keep)
        else:
            col, fit = pca_colours(g, k)
            ratios.append(fit.explained_variance_ratio.tolist())
        rgb.append(col)
    out = torch.cat(rgb).reshape(b, h, w, k).float().numpy()
    mask = torch.cat(fg).reshape(b, h, w).numpy() if cfg.mask_background else None
    return PCARGB(out, mask, ratios)


def upsample(rgb: np.ndarray, size: tuple[int, int], mode: str = "nearest") -> np.ndarray:
    """(B, h, w, C) maps -> (B, H, W, C) at image size (nearest or bilinear, half-pixel centres)."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    t = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(0, 3, 1, 2)
    kw = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(t, size=tuple(size), mode=mode, **kw)
    return out.permute(0, 2, 3, 1).clamp(0, 1).numpy()


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize so the short side is ``resolution`` (bicubic), then centre-crop a square."""
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.convert("RGB").resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def to_tensor01(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB images of one size -> (B, 3, H, W) float in [0, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
