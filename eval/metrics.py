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


def _check_range(pred, target, num_classes: int, ignore_index: int) -> None:
    """Out-of-range values would be counted in another (image, class) cell of the flat bincount
    without an error, so they are refused: labels outside 0..C-1 and ignore_index, predictions
    (of the kept pixels) outside 0..C-1."""
    for what, v, allowed in (
        ("label", target, f"0..{num_classes - 1} or {ignore_index}"),
        ("prediction", pred, f"0..{num_classes - 1}"),
    ):
        if v.numel() and (int(v.max()) >= num_classes or int(v.min()) < 0):
            raise ValueError(
                f"{what} values must be in {allowed}, got {int(v.min())}..{int(v.max())}"
            )


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``(C, C)`` int64 counts, rows = ground truth, columns = prediction."""
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    _check_range(pred, target, num_classes, ignore_index)
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
    _check_range(pred, target, num_classes, ignore_index)
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
    _check_range(pred[:, keep], target[keep], num_classes, ignore_index)
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


def _as_counts(counts) -> np.ndarray:
    return np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, np.float64)


def _pooled_miou(counts: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """mIoU (percent) of per-image ``(N, C, 3)`` counts pooled over all images, or over each
    resample given the multiplicities ``weights (R, N)`` (one matrix product for all)."""
    if weights is None:
        pooled = counts.sum(0)
    else:
        n = counts.shape[0]
        pooled = (weights @ counts.reshape(n, -1)).reshape(len(weights), *counts.shape[1:])
    with warnings.catch_warnings():  # a resample may miss every class with a union: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(iou_from_counts(pooled), axis=-1) * 100


def _resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` multiplicities of each image in each resample (n draws with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _spread(values: np.ndarray, level: float) -> dict[str, float]:
    """Standard error and percentile interval of the finite bootstrap values."""
    v = values[np.isfinite(values)]
    q = (1 - level) / 2
    return {
        "se": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
        "lo": float(np.quantile(v, q)) if v.size else float("nan"),
        "hi": float(np.quantile(v, 1 - q)) if v.size else float("nan"),
        "n_boot": int(v.size),
    }


_NO_SPREAD = {"se": float("nan"), "lo": float("nan"), "hi": float("nan"), "n_boot": 0}


def bootstrap_miou(
    counts: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Bootstrap over images of the pooled mIoU (in percent) from per-image ``(N, C, 3)`` counts.

    Each resample draws N images with replacement, pools their counts and takes the nanmean
    IoU, exactly as ``mean_iou`` does on the whole set. Returns the standard error (std of the
    resampled mIoUs) and the percentile interval at ``level``.
    """
    counts = _as_counts(counts)
    n = counts.shape[0]
    if n == 0 or n_boot <= 0:
        return dict(_NO_SPREAD)
    return _spread(_pooled_miou(counts, _resample_weights(n, n_boot, seed)), level)


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
    a, b = _as_counts(counts_a), _as_counts(counts_b)
    if a.shape != b.shape:
        raise ValueError(f"per-image counts differ in shape: {a.shape} vs {b.shape}")
    n = a.shape[0]
    ma, mb = float(_pooled_miou(a)), float(_pooled_miou(b))
    out = {"miou_a": ma, "miou_b": mb, "diff": ma - mb}
    if n == 0 or n_boot <= 0:
        return out | _NO_SPREAD | {"p": float("nan")}
    w = _resample_weights(n, n_boot, seed)
    d = _pooled_miou(a, w) - _pooled_miou(b, w)
    d = d[np.isfinite(d)]
    p = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))) if d.size else float("nan")
    return out | _spread(d, level) | {"p": float(p)}
