import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion

from eval.metrics import (
    batched_confusion,
    confusion_matrix,
    mean_iou,
    per_class_iou,
    per_image_confusion,
    pixel_accuracy,
)


def test_confusion_matches_hand_counts_and_ignores_255():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 3]])
    conf = confusion_matrix(pred, target, 4)
    want = np.array(
        [
            [1, 1, 0, 0],  # gt 0: one right, one -> 1
            [0, 2, 0, 1],  # gt 1: two right, one -> 3
            [1, 0, 1, 0],  # gt 2: one -> 0, one right
            [0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(conf.numpy(), want)


def test_iou_miou_pacc_hand_computed():
    conf = np.array([[3, 1, 0, 0], [2, 4, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    # IoU_c = TP / (row + col - TP); class 2 has empty union -> NaN, excluded from the mean;
    # class 3 is in the ground truth but never predicted -> IoU 0, included.
    iou = per_class_iou(conf)
    np.testing.assert_allclose(iou[[0, 1, 3]], [3 / 6, 4 / 8, 0.0])
    assert np.isnan(iou[2])
    assert mean_iou(conf) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert pixel_accuracy(conf) == pytest.approx(7 / 11)


def test_confusion_agrees_with_sklearn_and_batched_version():
    rng = np.random.default_rng(0)
    c = 5
    target = rng.integers(0, c, size=(3, 17, 13))
    target[rng.random(target.shape) < 0.1] = 255
    preds = rng.integers(0, c, size=(4, 3, 17, 13))
    keep = target != 255
    for i in range(4):
        ref = sk_confusion(target[keep], preds[i][keep], labels=list(range(c)))
        got = confusion_matrix(torch.from_numpy(preds[i]), torch.from_numpy(target), c)
        np.testing.assert_array_equal(got.numpy(), ref)
    batched = batched_confusion(torch.from_numpy(preds), torch.from_numpy(target), c)
    for i in range(4):
        ref = sk_confusion(target[keep], preds[i][keep], labels=list(range(c)))
        np.testing.assert_array_equal(batched[i].numpy(), ref)


def test_out_of_range_label_is_reported():
    with pytest.raises(ValueError, match="0..2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)


def test_out_of_range_prediction_is_refused_not_miscounted():
    """Issue 18: prediction 3 with C = 3 landed in the next row's cell of the flat bincount
    (target 0, pred 3 was counted as target 1, pred 0)."""
    target = torch.tensor([[0, 1, 255]])
    for bad in (3, -1):
        pred = torch.tensor([[0, bad, 1]])
        with pytest.raises(ValueError, match=r"prediction values must be in 0\.\.2, got"):
            confusion_matrix(pred, target, 3)
        with pytest.raises(ValueError, match="prediction"):
            batched_confusion(pred[None], target, 3)
        with pytest.raises(ValueError, match="prediction"):
            per_image_confusion(pred[None], target, 3)
    # a prediction under an ignored pixel is not counted, so it may be anything
    got = confusion_matrix(torch.tensor([0, 1, 9]), torch.tensor([0, 1, 255]), 3)
    np.testing.assert_array_equal(got.numpy(), np.diag([1, 1, 0]))
