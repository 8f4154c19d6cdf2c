"""VOC readers: synthetic round trip and the real format's edge cases."""

import numpy as np
import pytest
from PIL import Image

from dino_skipless.data import (
    DatasetError,
    VOCDetection,
    VOCSegmentation,
    build_detection_dataset,
    build_segmentation_dataset,
)
from dino_skipless.data.classes import voc_palette
from dino_skipless.data.generate import generate
from dino_skipless.data.voc import parse_voc_xml


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("voc"), "voc", n=12, size=64, seed=1)


@pytest.mark.parametrize("split", ["train", "val", "trainval", "trainaug"])
def test_segmentation_round_trip(voc, split):
    ds = build_segmentation_dataset("voc", voc.root, split)
    want = voc.masks[split]
    assert sorted(ds.ids) == sorted(want) and len(ds) > 0
    assert ds.num_classes == 21 and ds.ignore_index == 255
    for i, image_id in enumerate(ds.ids):
        img, mask = ds[i]
        assert img.mode == "RGB" and mask.dtype == np.uint8
        assert img.size == (mask.shape[1], mask.shape[0])
        np.testing.assert_array_equal(mask, want[image_id])


def test_palette_png_with_void_border(voc):
    ds = VOCSegmentation(voc.root, "train")
    path = ds.mask_path(0)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array(im.getpalette()[:6]).tolist() == [0, 0, 0, 128, 0, 0]
    mask = ds[0][1]
    assert (mask == 255).any() and (mask == 0).any() and ((mask > 0) & (mask < 21)).any()
    # The void band surrounds objects: every object pixel next to background is void-adjacent.
    objects = (mask > 0) & (mask < 255)
    assert not (objects[:, 1:] & (mask[:, :-1] == 0)).any()


def test_trainaug_sbd_only_images_have_no_border(voc):
    seg = set(voc.masks["trainval"])
    extra = [i for i in voc.masks["trainaug"] if i not in seg]
    assert extra
    ds = VOCSegmentation(voc.root, "trainaug")
    for image_id in extra:
        assert 255 not in ds[ds.ids.index(image_id)][1]


def test_trainaug_without_list_is_aug_masks_minus_val(voc, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(voc.root, root)
    (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt").unlink()
    ds = VOCSegmentation(root, "trainaug")
    assert sorted(ds.ids) == sorted(voc.masks["trainaug"])


def test_rgb_mask_is_mapped_through_palette(voc, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(voc.root, root)
    ds = VOCSegmentation(root, "val")
    want = ds[0][1]
    Image.open(ds.mask_path(0)).convert("RGB").save(ds.mask_path(0))
    np.testing.assert_array_equal(VOCSegmentation(root, "val")[0][1], want)


@pytest.mark.parametrize("name", ["voc12", "voc07"])
def test_detection_round_trip(voc, name):
    ds = build_detection_dataset(name, voc.root)
    want = voc.boxes[name]
    assert sorted(ds.ids) == sorted(want)
    assert ds.num_boxes == sum(len(t["boxes"]) for t in want.values())
    for i, image_id in enumerate(ds.ids):
        img, t = ds[i]
        assert t["image_id"] == image_id and t["boxes"].dtype == np.float32
        for key in ("boxes", "labels", "hard", "difficult", "truncated"):
            np.testing.assert_array_equal(t[key], want[image_id][key], err_msg=key)
        assert (t["boxes"][:, 2] <= img.width).all() and (t["boxes"][:, 3] <= img.height).all()
    hard = sum(int(t["hard"].sum()) for t in want.values())
    assert hard > 0  # the protocol keeps them by default


def test_no_hard_drops_hard_boxes_and_empty_images(voc):
    full = VOCDetection(voc.root, 2012)
    easy = VOCDetection(voc.root, 2012, no_hard=True)
    want = {i: t for i, t in voc.boxes["voc12"].items() if (~t["hard"]).any()}
    assert sorted(easy.ids) == sorted(want)
    assert easy.num_boxes == sum(int((~t["hard"]).sum()) for t in want.values())
    assert easy.num_boxes < full.num_boxes
    assert not any(easy.target(i)["hard"].any() for i in range(len(easy)))


XML = """<annotation>
  <folder>VOC2007</folder><filename>000001.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <object><name>dog</name><pose>Left</pose><truncated>1</truncated><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object>
  <object><name>person</name><difficult>1</difficult>
    <bndbox><xmin>5.0</xmin><ymin>6</ymin><xmax>12.7</xmax><ymax>20</ymax></bndbox>
    <part><name>head</name><bndbox><xmin>6</xmin><ymin>7</ymin><xmax>9</xmax><ymax>9</ymax>
    </bndbox></part></object>
  <object><name>cat</name><truncated>0</truncated><difficult>0</difficult>
    <bndbox><xmin>20</xmin><ymin>10</ymin><xmax>30</xmax><ymax>25</ymax></bndbox></object>
</annotation>"""


def _tiny_voc(root, xml=XML, size=(40, 30)):
    voc = root / "VOC2007"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / d).mkdir(parents=True)
    Image.new("RGB", size, (90, 30, 20)).save(voc / "JPEGImages/000001.jpg")
    (voc / "Annotations/000001.xml").write_text(xml)
    (voc / "ImageSets/Main/trainval.txt").write_text("000001\n")
    return root


def test_xml_difficult_truncated_multiple_boxes(tmp_path):
    size, objs = parse_voc_xml(_tiny_voc(tmp_path) / "VOC2007/Annotations/000001.xml")
    assert size == (40, 30) and [o.name for o in objs] == ["dog", "person", "cat"]
    assert objs[1].box == (5, 6, 12, 20)  # decimals truncated, the part's box ignored
    assert not objs[1].truncated  # a missing tag reads 0
    ds = VOCDetection(tmp_path, 2007)  # ROOT/VOC2007 layout
    t = ds[0][1]
    np.testing.assert_array_equal(
        t["boxes"], np.array([[0, 0, 40, 30], [4, 5, 12, 20], [19, 9, 30, 25]], np.float32)
    )
    assert t["hard"].tolist() == [True, True, False]
    assert t["difficult"].tolist() == [False, True, False]
    assert t["truncated"].tolist() == [True, False, False]
    assert [ds.class_names[k] for k in t["labels"]] == ["dog", "person", "cat"]
    easy = VOCDetection(tmp_path, 2007, no_hard=True)
    np.testing.assert_array_equal(easy[0][1]["boxes"], [[19, 9, 30, 25]])


def test_image_with_only_hard_objects_is_dropped_by_no_hard(tmp_path):
    xml = XML.replace(
        "<truncated>0</truncated><difficult>0</difficult>", "<difficult>1</difficult>"
    )
    _tiny_voc(tmp_path, xml)
    assert len(VOCDetection(tmp_path, 2007)) == 1
    assert len(VOCDetection(tmp_path, 2007, no_hard=True)) == 0


def test_bad_xml_and_unknown_class(tmp_path):
    _tiny_voc(tmp_path, XML.replace("</annotation>", ""))
    with pytest.raises(DatasetError, match="000001.xml"):
        VOCDetection(tmp_path, 2007)
    assert len(VOCDetection(tmp_path, 2007, on_error="skip")) == 0
    (tmp_path / "VOC2007/Annotations/000001.xml").write_text(XML.replace("dog", "dragon"))
    with pytest.raises(DatasetError, match="dragon"):
        VOCDetection(tmp_path, 2007)


def test_missing_root_and_split_file(tmp_path, voc):
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "Expected layout" in msg and "JPEGImages" in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(voc.root, root)
    split = root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    split.unlink()
    with pytest.raises(DatasetError, match=str(split)):
        VOCSegmentation(root, "val")
    shutil.rmtree(root / "VOCdevkit/VOC2012/SegmentationClassAug")
    with pytest.raises(DatasetError, match="SegmentationClassAug"):
        VOCSegmentation(root, "trainaug")


def test_palette_png_edge_case_handmade(tmp_path):
    """A real-VOC-like mask: an object with a 255 outline, and the palette stored in the PNG."""
    voc = tmp_path / "VOCdevkit/VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    mask = np.zeros((20, 24), np.uint8)
    mask[5:15, 6:18] = 255
    mask[6:14, 7:17] = 15  # person inside its void outline
    im = Image.fromarray(mask)
    im.putpalette(voc_palette().tobytes())
    im.save(voc / "SegmentationClass/a.png")
    Image.new("RGB", (24, 20)).save(voc / "JPEGImages/a.jpg")
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\n")
    got = VOCSegmentation(tmp_path, "train")[0][1]
    np.testing.assert_array_equal(got, mask)
    problems, classes = VOCSegmentation(tmp_path, "train").check_sample(0)
    assert problems == [] and classes == {0, 15}
