"""Segmentation metrics from one confusion matrix accumulated over the whole validation set.

Conventions (mmseg's ``IoUMetric``): pixels labelled ``ignore_index`` are dropped; the IoU of
class c is ``TP / (TP + FP + FN)``; a class with an empty union (absent from both the ground
truth and the predictions of the whole set) has IoU NaN and is excluded from the mean
(``nanmean``). Pixel accuracy is ``trace / total`` over the non-ignored pixels.
"""

from __future__ import annotations

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
