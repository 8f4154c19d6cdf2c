"""IoU and CorLoc as the TokenCut/LOST evaluation computes them.

Boxes are ``[x0, y0, x1, y1]`` in continuous pixel coordinates (no ``+1`` in widths). The official
``bbox_iou`` (from YOLOv5) adds ``eps = 1e-7`` to both heights and to the union, but it gets
integer boxes (int64 tensors), so ``height + eps`` is promoted to float32, where 1e-7 is below
half an ulp of any height >= 2 and of any union >= 2: the epsilon vanishes and an IoU of exactly
0.5 counts as correct. ``box_iou`` repeats that float32 arithmetic step by step, so it returns the
official value bit for bit and CorLoc takes the official decision at the threshold;
``dtype=np.float64, eps=0`` gives the exact IoU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# the paired tests live with the project's other statistics; importable from here as before
from dino_skipless.stats import mcnemar_exact, paired_diff_se  # noqa: F401

OFFICIAL_IOU_EPS = 1e-7


def box_iou(
    box: Sequence[float], gt: np.ndarray, eps: float = OFFICIAL_IOU_EPS, dtype=np.float32
) -> np.ndarray:
    """IoU of one box with each of ``gt`` ``(K, 4)``; returns ``(K,)`` float64 (empty for K = 0).

    Every operation runs in ``dtype``, in the official order (see the module docstring)."""
    t = np.dtype(dtype).type
    b = np.asarray(box, dtype=dtype).reshape(4)
    g = np.asarray(gt, dtype=dtype).reshape(-1, 4)
    iw = (np.minimum(b[2], g[:, 2]) - np.maximum(b[0], g[:, 0])).clip(min=0)
    ih = (np.minimum(b[3], g[:, 3]) - np.maximum(b[1], g[:, 1])).clip(min=0)
    inter = iw * ih
    e = t(eps)
    a1 = (b[2] - b[0]) * (b[3] - b[1] + e)
    a2 = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1] + e)
    union = a1 + a2 - inter + e
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, t(1)), t(0))
    return iou.astype(np.float64)


def best_iou(box: Sequence[float], gt: np.ndarray, eps: float = OFFICIAL_IOU_EPS) -> float:
    """Largest IoU of ``box`` with any ground-truth box (``nan`` when there is none)."""
    ious = box_iou(box, gt, eps)
    return float(ious.max()) if len(ious) else float("nan")


def corloc(best_ious: Sequence[float], threshold: float = 0.5) -> float:
    """Percentage of images whose box has IoU >= ``threshold`` with at least one GT box.

    ``best_ious``: one value per evaluated image (images without GT must not be passed).
    """
    v = np.asarray(best_ious, dtype=np.float64)
    if v.size == 0:
        raise ValueError("CorLoc of zero images is undefined")
    if np.isnan(v).any():
        raise ValueError("an image without ground-truth boxes was passed to corloc()")
    return float(100.0 * np.mean(v >= threshold))
