"""Segmentation metrics from one confusion matrix accumulated over the whole validation set.

Conventions (mmseg's ``IoUMetric``): pixels labelled ``ignore_index`` are dropped; the IoU of
class c is ``TP / (TP + FP + FN)``; a class with an empty union (absent from both the ground
truth and the predictions of the whole set) has IoU NaN and is excluded from the mean
(``nanmean``). Pixel accuracy is ``trace / total`` over the non-ignored pixels.

Error bars: the per-class TP / FP / FN counts are sums over images, so keeping them per image
lets a bootstrap over validation images resample the whole-set mIoU exactly as it is computed
(one pooled confusion per resample), at the cost of ``N x C x 3`` integers.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``(C, C)`` int64 counts, rows = ground truth, columns = prediction."""
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.max()) >= num_classes or int(target.min()) < 0):
        raise ValueError(
            f"label values must be in 0..{num_classes - 1} or {ignore_index}, "
            f"got {int(target.min())}..{int(target.max())}"
        )
    idx = target * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def batched_confusion(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``(L, C, C)`` confusion matrices of L predictions ``(L, ...)`` of the same target ``(...)``,
    in one bincount (the L probes of a learning-rate sweep)."""
    n_l = pred.shape[0]
    pred = pred.reshape(n_l, -1).long()
    target = target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[:, keep], target[keep]
    offs = torch.arange(n_l, device=pred.device).view(-1, 1) * num_classes * num_classes
    idx = offs + target.view(1, -1) * num_classes + pred
    return torch.bincount(idx.reshape(-1), minlength=n_l * num_classes * num_classes).reshape(
        n_l, num_classes, num_classes
    )


def per_image_confusion(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``(L, B, C, C)`` confusions of L predictions ``(L, B, ...)`` of B images ``(B, ...)``,
    each image counted on its own, in one bincount (bootstrap over images needs them apart)."""
    n_l, b = pred.shape[:2]
    pred = pred.reshape(n_l, b, -1).long()
    target = target.reshape(b, -1).long()
    keep = target != ignore_index
    cc = num_classes * num_classes
    image = torch.arange(b, device=target.device).view(b, 1).expand_as(target)
    base = (image * cc + target * num_classes)[keep]  # (K,) over kept pixels of all images
    offs = torch.arange(n_l, device=pred.device).view(-1, 1) * b * cc
    idx = offs + base.view(1, -1) + pred[:, keep]
    return torch.bincount(idx.reshape(-1), minlength=n_l * b * cc).reshape(
        n_l, b, num_classes, num_classes
    )


def per_class_iou(conf: np.ndarray | torch.Tensor) -> np.ndarray:
    """IoU of each class in ``[0, 1]``; NaN where the class has an empty union."""
    conf = np.asarray(conf.cpu() if isinstance(conf, torch.Tensor) else conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(conf: np.ndarray | torch.Tensor) -> float:
    """Mean IoU in ``[0, 1]`` over classes with a non-empty union (NaN if there is none)."""
    iou = per_class_iou(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(conf: np.ndarray | torch.Tensor) -> float:
    conf = np.asarray(conf.cpu() if isinstance(conf, torch.Tensor) else conf, dtype=np.float64)
    total = conf.sum()
    return float(np.trace(conf) / total) if total > 0 else float("nan")


def tp_fp_fn(conf: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(..., C, 3)`` per-class TP, FP, FN of ``(..., C, C)`` confusions (rows = truth)."""
    conf = torch.as_tensor(conf)
    tp = torch.diagonal(conf, dim1=-2, dim2=-1)
    fp = conf.sum(-2) - tp
    fn = conf.sum(-1) - tp
    return torch.stack([tp, fp, fn], dim=-1)


def iou_from_counts(counts: np.ndarray) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)`` of ``(..., C, 3)`` counts; NaN for empty unions."""
    counts = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, np.float64)
    union = counts.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, counts[..., 0] / np.maximum(union, 1), np.nan)


def bootstrap_miou(
    counts: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Bootstrap over images of the pooled mIoU (in percent) from per-image ``(N, C, 3)`` counts.

    Each resample draws N images with replacement, pools their counts and takes the nanmean
    IoU, exactly as ``mean_iou`` does on the whole set. Returns the standard error (std of the
    resampled mIoUs) and the percentile interval at ``level``.
    """
    counts = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, np.float64)
    n = counts.shape[0]
    if n == 0 or n_boot <= 0:
        return {"se": float("nan"), "lo": float("nan"), "hi": float("nan"), "n_boot": 0}
    rng = np.random.default_rng(seed)
    # multiplicity of each image in each resample: pooling is then one matrix product
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    pooled = (weights @ counts.reshape(n, -1)).reshape(n_boot, *counts.shape[1:])
    iou = iou_from_counts(pooled)
    with warnings.catch_warnings():  # a resample may miss every class with a union: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        miou = np.nanmean(iou, axis=-1) * 100
    miou = miou[np.isfinite(miou)]
    a = (1 - level) / 2
    return {
        "se": float(miou.std(ddof=1)) if miou.size > 1 else float("nan"),
        "lo": float(np.quantile(miou, a)) if miou.size else float("nan"),
        "hi": float(np.quantile(miou, 1 - a)) if miou.size else float("nan"),
        "n_boot": int(miou.size),
    }


def paired_bootstrap_miou(
    counts_a: np.ndarray,
    counts_b: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Paired bootstrap of ``mIoU(A) - mIoU(B)`` (percent) over the images both were scored on.

    ``counts_*``: per-image ``(N, C, 3)`` TP/FP/FN of the same N images in the same order. Each
    resample draws one multiset of images and pools *both* runs' counts over it, so what the two
    share (hard images, rare classes) cancels and only their disagreement is left in the spread.
    ``p`` is the two-sided percentile-bootstrap p-value of the difference being 0.
    """
    a = np.asarray(counts_a.cpu() if isinstance(counts_a, torch.Tensor) else counts_a, np.float64)
    b = np.asarray(counts_b.cpu() if isinstance(counts_b, torch.Tensor) else counts_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"per-image counts differ in shape: {a.shape} vs {b.shape}")
    n = a.shape[0]

    def miou(pooled):
        with warnings.catch_warnings():  # a class with no union anywhere: NaN, skipped
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(iou_from_counts(pooled), axis=-1) * 100

    diff = float(miou(a.sum(0)) - miou(b.sum(0)))
    out = {"miou_a": float(miou(a.sum(0))), "miou_b": float(miou(b.sum(0))), "diff": diff}
    if n == 0 or n_boot <= 0:
        return out | {
            "se": float("nan"),
            "lo": float("nan"),
            "hi": float("nan"),
            "p": float("nan"),
            "n_boot": 0,
        }
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    da = miou((weights @ a.reshape(n, -1)).reshape(n_boot, *a.shape[1:]))
    db = miou((weights @ b.reshape(n, -1)).reshape(n_boot, *b.shape[1:]))
    d = (da - db)[np.isfinite(da - db)]
    q = (1 - level) / 2
    p = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))) if d.size else float("nan")
    return out | {
        "se": float(d.std(ddof=1)) if d.size > 1 else float("nan"),
        "lo": float(np.quantile(d, q)) if d.size else float("nan"),
        "hi": float(np.quantile(d, 1 - q)) if d.size else float("nan"),
        "p": float(p),
        "n_boot": int(d.size),
    }
