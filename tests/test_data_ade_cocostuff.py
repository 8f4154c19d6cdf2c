"""ADE20K and COCO-Stuff readers: synthetic round trip, id mappings, subsets."""

import shutil

import numpy as np
import pytest
from PIL import Image

from dino_skipless.data import (
    ADE20KSegmentation,
    COCOStuffSegmentation,
    DatasetError,
    build_segmentation_dataset,
)
from dino_skipless.data.classes import cocostuff_lut
from dino_skipless.data.generate import generate


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("ade"), "ade20k", n=10, size=64, seed=2)


@pytest.fixture(scope="module")
def cocostuff(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("cs"), "cocostuff", n=10, size=64, seed=3)


def _round_trip(ds, want):
    assert sorted(ds.ids) == sorted(want) and len(ds) > 0
    for i, image_id in enumerate(ds.ids):
        img, mask = ds[i]
        assert img.mode == "RGB" and mask.shape == (img.height, img.width)
        np.testing.assert_array_equal(mask, want[image_id])


@pytest.mark.parametrize("split", ["train", "val"])
def test_ade_round_trip(ade, split):
    ds = build_segmentation_dataset("ade20k", ade.root, split)
    assert ds.num_classes == 150 and ds.class_names[0] == "wall"
    _round_trip(ds, ade.masks[split])


def test_ade_label_zero_is_ignored(ade):
    raw = ade.raw_masks["train"]["ADE_train_00000001"]
    assert (raw == 0).any()  # the generator forces an unlabelled region into image 0
    ds = ADE20KSegmentation(ade.root, "train")
    mask = ds[ds.ids.index("ADE_train_00000001")][1]
    assert (mask[raw == 0] == 255).all()
    np.testing.assert_array_equal(mask[raw > 0], raw[raw > 0] - 1)
    # ROOT may be ADEChallengeData2016 itself.
    assert ADE20KSegmentation(ade.root / "ADEChallengeData2016", "train").ids == ds.ids


@pytest.mark.parametrize("split", ["train", "val"])
def test_cocostuff_round_trip(cocostuff, split):
    ds = COCOStuffSegmentation(cocostuff.root, split)
    assert ds.num_classes == 171
    _round_trip(ds, cocostuff.masks[split])


def test_cocostuff_raw_ids_and_coarse(cocostuff):
    raw = np.concatenate([m.ravel() for m in cocostuff.raw_masks["train"].values()])
    present = set(np.unique(raw).tolist())
    assert 255 in present and 89 in present  # unlabelled and toothbrush (raw 89 -> 79)
    ds = COCOStuffSegmentation(cocostuff.root, "train")
    fine = np.concatenate([ds[i][1].ravel() for i in range(len(ds))])
    assert 79 in set(fine.tolist()) and ds.class_names[79] == "toothbrush"
    coarse = build_segmentation_dataset("cocostuff27", cocostuff.root, "train")
    assert coarse.num_classes == 27
    lut = cocostuff_lut(coarse=True)
    for i, image_id in enumerate(coarse.ids):
        np.testing.assert_array_equal(coarse[i][1], lut[cocostuff.raw_masks["train"][image_id]])


def test_cocostuff_mmseg_label_train_ids(cocostuff, tmp_path):
    root = tmp_path / "mm"
    shutil.copytree(cocostuff.root / "images", root / "images")
    out = root / "annotations" / "val2017"
    out.mkdir(parents=True)
    for image_id, fine in cocostuff.masks["val"].items():
        Image.fromarray(fine).save(out / f"{image_id}_labelTrainIds.png")
    _round_trip(COCOStuffSegmentation(root, "val"), cocostuff.masks["val"])


def test_subset_is_seeded_sorted_and_sized(cocostuff):
    full = COCOStuffSegmentation(cocostuff.root, "train")
    a = COCOStuffSegmentation(cocostuff.root, "train", subset=3, subset_seed=0)
    b = COCOStuffSegmentation(cocostuff.root, "train", subset=3, subset_seed=0)
    c = COCOStuffSegmentation(cocostuff.root, "train", subset=3, subset_seed=5)
    assert a.ids == b.ids and len(a) == 3 and set(a.ids) <= set(full.ids)
    assert a.ids == sorted(a.ids, key=full.ids.index)
    assert a.ids != c.ids
    assert COCOStuffSegmentation(cocostuff.root, "train", subset=10_000).ids == full.ids


def test_transform_gets_image_and_mask(ade):
    ds = ADE20KSegmentation(ade.root, "val", transform=lambda img, m: (img.size, m.sum()))
    size, total = ds[0]
    assert size == (64, 64) and total == ADE20KSegmentation(ade.root, "val")[0][1].sum()


def test_layout_errors(tmp_path, cocostuff):
    with pytest.raises(DatasetError) as e:
        COCOStuffSegmentation(tmp_path / "none", "train")
    assert str(tmp_path / "none") in str(e.value) and "stuffthingmaps" in str(e.value)
    root = tmp_path / "cs"
    shutil.copytree(cocostuff.root / "images", root / "images")
    with pytest.raises(DatasetError, match="label maps not found"):
        COCOStuffSegmentation(root, "train")
    with pytest.raises(ValueError, match="split"):
        ADE20KSegmentation(tmp_path, "test")
