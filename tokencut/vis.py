"""``--save-vis``: the image with the discovered object's patch mask (blue tint), the predicted
box (red) and the ground-truth boxes (green)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PRED_COLOR = (255, 0, 0)
GT_COLOR = (0, 255, 0)
MASK_COLOR = (0, 90, 255)
MASK_ALPHA = 0.45


def overlay_mask(image: Image.Image, mask: np.ndarray, patch: int) -> Image.Image:
    """Tint the pixels of the patches in ``mask`` (patch grid, covering the padded image)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = rgb.shape[:2]
    up = np.kron(np.asarray(mask, dtype=np.uint8), np.ones((patch, patch), np.uint8))[:h, :w]
    m = up.astype(bool)[..., None]
    tinted = (1 - MASK_ALPHA) * rgb + MASK_ALPHA * np.asarray(MASK_COLOR, np.float32)
    return Image.fromarray(np.where(m, tinted, rgb).round().astype(np.uint8))


def draw_boxes(image: Image.Image, pred_box, gt_boxes, width: int = 2) -> Image.Image:
    img = image.copy()
    draw = ImageDraw.Draw(img)
    # Boxes are continuous [x0, y0, x1, y1]; PIL's rectangle corners are inclusive pixels.
    for b in np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4):
        draw.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=GT_COLOR, width=width)
    if pred_box is not None:
        b = pred_box
        draw.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=PRED_COLOR, width=width)
    return img


def save_tokencut_vis(
    path: str | Path,
    image: Image.Image,
    pred_box,
    gt_boxes,
    mask: np.ndarray | None,
    patch: int,
) -> Path:
    img = image.convert("RGB")
    if mask is not None:
        img = overlay_mask(img, mask, patch)
    img = draw_boxes(img, pred_box, gt_boxes, width=max(1, round(min(img.size) / 150)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
