"""COCO20k reader: list selection, LOST's box protocol, crowd and empty images."""

import importlib.resources
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_skipless.data import COCO20kDetection, DatasetError, build_detection_dataset
from dino_skipless.data.coco20k import SHIPPED_LIST
from dino_skipless.data.generate import generate


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("coco"), "coco20k", n=12, size=64, seed=4)


def test_round_trip(coco):
    ds = build_detection_dataset("coco20k", coco.root)
    want = coco.boxes["coco20k"]
    assert ds.ids == list(want)  # the list's order, unlisted images left out
    assert len(ds) == 11 and ds.num_classes == 80 and ds.class_names[0] == "person"
    for i, image_id in enumerate(ds.ids):
        img, t = ds[i]
        assert t["image_id"] == image_id and img.size == (64, 64)
        for key in ("boxes", "labels", "hard", "category_id"):
            np.testing.assert_array_equal(t[key], want[image_id][key], err_msg=key)
        assert [ds.category_ids[k] for k in t["labels"]] == t["category_id"].tolist()


def test_crowd_dropped_and_empty_images_kept(coco):
    doc = json.loads((coco.root / "annotations/instances_train2014.json").read_text())
    crowd = [a for a in doc["annotations"] if a["iscrowd"]]
    assert crowd and isinstance(crowd[0]["segmentation"]["counts"], list)
    ds = COCO20kDetection(coco.root)
    t1, t2 = ds.target(ds.ids.index("COCO_train2014_000000000002")), ds.target(2)
    assert t1["boxes"].shape == (0, 4)  # no annotation at all
    assert t2["boxes"].shape == (0, 4)  # only a crowd annotation
    with_anns = {a["image_id"] for a in doc["annotations"]}
    assert 2 not in with_anns and 3 in with_anns
    assert ds.num_boxes == sum(
        1 for a in doc["annotations"] if not a["iscrowd"] and a["image_id"] % 10 != 0
    )
    easy = COCO20kDetection(coco.root, no_hard=True)
    assert "COCO_train2014_000000000002" not in easy.ids and len(easy) < len(ds)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_crowd_rle_decodes_to_the_object(coco):
    from pycocotools.coco import COCO

    c = COCO(str(coco.root / "annotations/instances_train2014.json"))
    for a in c.dataset["annotations"]:
        m = c.annToMask(a)
        assert m.sum() > 0
        if a["iscrowd"]:
            assert m.sum() == a["area"]


def test_lost_rounding_on_handmade_json(tmp_path):
    (tmp_path / "train2014").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.new("RGB", (50, 40)).save(tmp_path / "train2014/COCO_train2014_000000000007.jpg")
    Image.new("RGB", (50, 40)).save(tmp_path / "train2014/COCO_train2014_000000000008.jpg")
    doc = {
        "images": [
            {"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "width": 50, "height": 40},
            {"id": 8, "file_name": "COCO_train2014_000000000008.jpg", "width": 50, "height": 40},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 18,
                "bbox": [2.5, 3.5, 10.0, 20.4],
                "iscrowd": 0,
                "area": 1.0,
                "segmentation": [],
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 1,
                "bbox": [0, 0, 50, 40],
                "iscrowd": 1,
                "area": 1.0,
                "segmentation": {"counts": [0, 2000], "size": [40, 50]},
            },
        ],
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 18, "name": "dog", "supercategory": "animal"},
        ],
    }
    (tmp_path / "annotations/instances_train2014.json").write_text(json.dumps(doc))
    lst = tmp_path / "my_list.txt"
    lst.write_text(
        "train2014/COCO_train2014_000000000007.jpg\ntrain2014/COCO_train2014_000000000008.jpg\n"
    )
    ds = COCO20kDetection(tmp_path, file_list=lst)
    # int(round(.)) with Python's halves-to-even: 2.5 -> 2, 3.5 -> 4, 12.5 -> 12, 23.9 -> 24.
    np.testing.assert_array_equal(ds.target(0)["boxes"], [[2, 4, 12, 24]])
    assert ds.class_names == ["person", "dog"] and ds.target(0)["labels"].tolist() == [1]
    assert ds.target(1)["boxes"].shape == (0, 4)
    # images/train2014 is accepted as well.
    (tmp_path / "images").mkdir()
    shutil.move(tmp_path / "train2014", tmp_path / "images/train2014")
    assert len(COCO20kDetection(tmp_path, file_list=lst)) == 2


def test_shipped_list_is_package_data():
    # what a non-editable install has: the list inside the package, found by importlib
    shipped = importlib.resources.files("dino_skipless.data").joinpath("coco_20k_filenames.txt")
    lines = shipped.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 19817 and lines[0].startswith("train2014/COCO_train2014_")
    assert Path(str(SHIPPED_LIST)) == Path(str(shipped))


def test_shipped_list_and_errors(coco, tmp_path):
    lines = SHIPPED_LIST.read_text().splitlines()
    assert len(lines) == 19817 and lines[0].startswith("train2014/COCO_train2014_")
    with pytest.raises(DatasetError) as e:
        COCO20kDetection(tmp_path)
    assert "instances_train2014.json" in str(e.value) and str(tmp_path) in str(e.value)
    root = tmp_path / "copy"
    shutil.copytree(coco.root, root)
    (root / "coco_20k_filenames.txt").unlink()
    # Falls back to the shipped list, whose images this copy lacks.
    with pytest.raises(DatasetError, match="not in"):
        COCO20kDetection(root)
    assert len(COCO20kDetection(root, on_error="skip")) == 0
    (root / "annotations/instances_train2014.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        COCO20kDetection(root)
