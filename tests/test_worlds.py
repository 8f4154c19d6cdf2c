"""The small worlds built from dependencies' images (``dino_skipless/data/worlds.py``)."""

import hashlib

import numpy as np
import pytest

from dino_skipless.data import ImageFolderDataset
from dino_skipless.data.worlds import (
    CROP_SIDE,
    PHOTOS,
    TRAIN_SHARE,
    digit_image,
    generate_world,
    knn_root_of,
    load_photo,
    photo_crop_box,
    pretrain_root,
    world_root,
)


@pytest.mark.parametrize("shape", [(300, 451), (512, 512), (660, 550)])
def test_photo_crops_come_from_disjoint_regions(shape):
    h, w = shape
    long_axis = 1 if w >= h else 0
    cut = round(TRAIN_SHARE * max(h, w))
    short = min(h, w)
    for split in ("train", "val"):
        for i in range(300):
            top, left, hh, ww = photo_crop_box(np.random.default_rng([7, i]), h, w, split)
            assert hh == ww and 0 <= top and top + hh <= h and 0 <= left and left + ww <= w
            assert CROP_SIDE[0] * short - 1 <= hh <= CROP_SIDE[1] * short + 1
            lo, hi = (top, top + hh) if long_axis == 0 else (left, left + ww)
            # no validation pixel was ever inside a training crop, and vice versa
            assert (hi <= cut) if split == "train" else (lo >= cut), (split, lo, hi, cut)


def test_every_photo_ships_with_scikit_image():
    for name in PHOTOS:
        img = load_photo(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert min(img.shape[:2]) >= 150, name  # crops of 1/5-1/3 stay >= 30 px


def _digest(root):
    return hashlib.sha256(
        b"".join(p.read_bytes() for p in sorted(root.rglob("*.jpg")) + sorted(root.rglob("*.png")))
    ).hexdigest()


def test_photos_world_layout_and_determinism(tmp_path):
    counts = generate_world(tmp_path / "a", "photos", n=30, size=32, seed=3)
    assert counts == {"train": 30, "val": 30, "classes": 15}
    train = ImageFolderDataset(tmp_path / "a" / "train")
    val = ImageFolderDataset(tmp_path / "a" / "val")
    assert train.classes == val.classes == sorted(PHOTOS) and len(train) == len(val) == 30
    img, label = train[0]
    assert img.size == (32, 32) and train.classes[label] == "astronaut"
    generate_world(tmp_path / "b", "photos", n=30, size=32, seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # a pure function of its args
    generate_world(tmp_path / "c", "photos", n=30, size=32, seed=4)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_digits_are_upscaled_white_on_black():
    px = np.zeros((8, 8))
    px[2:6, 3] = 16  # a vertical stroke at full intensity
    img = np.asarray(digit_image(px, 64), dtype=float)
    assert img.shape == (64, 64) and img.max() > 200 and img[:8].max() == 0
    # bilinear upscaling keeps the mean grey level (up to the border)
    assert img.mean() == pytest.approx(px.mean() * 255 / 16, rel=0.1)


def test_world_roots_are_cached_and_split_by_use(tmp_path):
    root = world_root("digits", 60, 16, seed=0, cache_dir=tmp_path)
    ds = ImageFolderDataset(root)
    assert len(ds) == 60 and ds.classes == [str(c) for c in range(10)]
    stamp = (root / "world.json").stat().st_mtime_ns
    assert world_root("digits", 60, 16, seed=0, cache_dir=tmp_path) == root
    assert (root / "world.json").stat().st_mtime_ns == stamp  # not regenerated
    # digits: pretraining and k-NN read the same folder (k-NN splits it per class);
    # photos: pretraining reads train/ only
    assert pretrain_root("digits", 60, 16, 0, tmp_path) == knn_root_of(
        "digits", 60, 16, 0, tmp_path
    )
    photos = world_root("photos", 15, 16, seed=0, cache_dir=tmp_path)
    assert pretrain_root("photos", 15, 16, 0, tmp_path) == photos / "train"
    assert knn_root_of("photos", 15, 16, 0, tmp_path) == photos
