"""Mask values outside a dataset's label set: counted per sample (they read as ignore), and
stray colours of RGB masks (not in the palette) reported by data.check."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dino_skipless.data import VOCSegmentation
from dino_skipless.data.classes import voc_palette


def _voc_with_mask(root, mask_rgb_or_ids, name="a"):
    voc = root / "VOCdevkit/VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask_rgb_or_ids).save(voc / f"SegmentationClass/{name}.png")
    h, w = mask_rgb_or_ids.shape[:2]
    Image.new("RGB", (w, h)).save(voc / f"JPEGImages/{name}.jpg")
    (voc / "ImageSets/Segmentation/train.txt").write_text(f"{name}\n")
    return voc / f"SegmentationClass/{name}.png"


def test_stray_rgb_colours_are_a_problem_for_the_checker(tmp_path):
    """A VOC mask re-saved as RGB with colours outside the palette (antialiased edges): they
    read as ignore, and the checker used to say nothing, since 255 is a valid value."""
    pal = voc_palette()
    ids = np.zeros((10, 10), np.uint8)
    ids[2:8, 2:8] = 15
    rgb = pal[ids].astype(np.uint8)
    rgb[2, 2:5] = (10, 200, 30)  # 3 pixels of a colour VOC does not use
    path = _voc_with_mask(tmp_path, rgb)
    ds = VOCSegmentation(tmp_path, "train")
    assert ds[0][1][2, 2] == 255  # read as ignore
    problems, classes = ds.check_sample(0)
    assert classes == {0, 15}
    assert len(problems) == 1 and str(path) in problems[0] and "3 pixels" in problems[0]
    assert "palette" in problems[0]


def test_unknown_pixels_are_counted_per_sample(tmp_path):
    ids = np.zeros((10, 10), np.uint8)
    ids[:2] = 77  # VOC has 21 classes: 77 is no class, and not the 255 border
    ids[2, :5] = 255
    _voc_with_mask(tmp_path, ids)
    ds = VOCSegmentation(tmp_path, "train")
    img, mask, unknown = ds.sample_counted(0)
    assert unknown == 20 and (mask[:2] == 255).all() and img.size == (10, 10)
    problems, _ = ds.check_sample(0)
    assert "[77]" in problems[0] and "20 pixels" in problems[0]
