"""PASCAL VOC: segmentation (VOC2012 train/val/trainaug) and detection boxes (VOC07/VOC12).

Detection follows the object-discovery protocol of LOST/TokenCut's official code: the image set
is ``ImageSets/Main/trainval.txt``; every object is ground truth, ``difficult`` and ``truncated``
ones included; a box is ``(xmin - 1, ymin - 1, xmax, ymax)`` because the XML holds 1-based
inclusive pixel indices and the protocol measures IoU in continuous coordinates. ``no_hard=True``
reproduces its ``--no_hard`` option: hard (difficult or truncated) boxes are dropped and so are
images left without a box.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layouts
from .base import DetectionDataset, DetectionRecord, SegmentationDataset
from .classes import VOC_CLASSES, VOC_OBJECT_CLASSES, voc_lut, voc_palette
from .errors import DatasetError, first_existing, require_dir, with_layout
from .files import listdir_set, read_id_list

VOC_SEG_SPLITS = ("train", "val", "trainval", "trainaug")
_TRAINAUG_LISTS = ("trainaug.txt", "train_aug.txt")


def find_voc_dir(root: str | Path, year: int | str = 2012) -> Path:
    """The ``VOC<year>`` folder under a root that holds VOCdevkit (or is it, or is VOC<year>)."""
    root = Path(root)
    name = f"VOC{year}"
    candidates = [root / "VOCdevkit" / name, root / name]
    if root.name == name:
        candidates.insert(0, root)
    return first_existing(candidates, f"PASCAL {name}", layouts.VOC)


class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC2012 semantic segmentation: 21 classes (0 = background), 255 = void border.

    Splits: ``train`` (1,464), ``val`` (1,449), ``trainval`` and ``trainaug`` (10,582 with SBD).
    ``trainaug`` reads ``SegmentationClassAug/`` and its list from ``ImageSets/Segmentation/
    trainaug.txt`` (or ``train_aug.txt``); without a list it is every image that has an Aug
    mask, minus the val images.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable | None = None,
        *,
        year: int = 2012,
        subset: int | None = None,
        subset_seed: int = 0,
        on_error: str = "raise",
        validate: bool = False,
    ):
        if split not in VOC_SEG_SPLITS:
            raise ValueError(f"VOC segmentation split must be one of {VOC_SEG_SPLITS}: {split!r}")
        voc = find_voc_dir(root, year)
        seg_sets = voc / "ImageSets" / "Segmentation"
        require_dir(voc / "JPEGImages", f"VOC{year} JPEGImages", layouts.VOC)
        if split == "trainaug":
            mask_dir = require_dir(
                voc / "SegmentationClassAug",
                "SBD masks (SegmentationClassAug, needed for split 'trainaug')",
                layouts.VOC,
            )
            ids = _trainaug_ids(seg_sets, mask_dir)
        else:
            mask_dir = require_dir(voc / "SegmentationClass", "VOC SegmentationClass", layouts.VOC)
            ids = read_id_list(seg_sets / f"{split}.txt", f"VOC split file '{split}'", layouts.VOC)
        samples = [(i, voc / "JPEGImages" / f"{i}.jpg", mask_dir / f"{i}.png") for i in ids]
        super().__init__(
            samples,
            name="voc" if int(year) == 2012 else f"voc{str(year)[-2:]}",
            class_names=VOC_CLASSES,
            lut=voc_lut(),
            root=Path(root),
            split=split,
            transform=transform,
            subset=subset,
            subset_seed=subset_seed,
            on_error=on_error,
            validate=validate,
            palette=voc_palette(),
        )


def _trainaug_ids(seg_sets: Path, mask_dir: Path) -> list[str]:
    for name in _TRAINAUG_LISTS:
        if (seg_sets / name).is_file():
            return read_id_list(seg_sets / name, "VOC trainaug list", layouts.VOC)
    val = set(read_id_list(seg_sets / "val.txt", "VOC split file 'val'", layouts.VOC))
    ids = sorted(n[:-4] for n in listdir_set(mask_dir) if n.endswith(".png"))
    ids = [i for i in ids if i not in val]
    if not ids:
        raise DatasetError(with_layout(f"no masks in {mask_dir}", layouts.VOC))
    return ids


@dataclass
class VOCObject:
    name: str
    box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax as written (1-based, inclusive)
    difficult: bool
    truncated: bool


def parse_voc_xml(path: Path) -> tuple[tuple[int, int] | None, list[VOCObject]]:
    """((width, height) or None, objects) of one VOC annotation file.

    Missing ``difficult``/``truncated`` tags read as 0 (some VOC2012 files omit them);
    coordinates written as decimals are truncated to int, as ``int(float(x))``.
    """
    try:
        tree = ET.parse(path)
    except FileNotFoundError as e:
        raise DatasetError(f"annotation missing: {path}") from e
    except ET.ParseError as e:
        raise DatasetError(f"unparseable annotation {path}: {e}") from e
    ann = tree.getroot()
    size = None
    s = ann.find("size")
    if s is not None:
        try:
            w, h = int(s.findtext("width", "0")), int(s.findtext("height", "0"))
            size = (w, h) if w > 0 and h > 0 else None
        except ValueError:
            size = None
    objects = []
    for obj in ann.findall("object"):
        bb = obj.find("bndbox")
        name = (obj.findtext("name") or "").strip()
        if bb is None or not name:
            raise DatasetError(f"object without name or bndbox in {path}")
        try:
            box = tuple(int(float(bb.findtext(k, ""))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise DatasetError(f"bad bndbox coordinates in {path}: {e}") from e
        objects.append(
            VOCObject(
                name=name,
                box=box,  # type: ignore[arg-type]
                difficult=_flag(obj, "difficult"),
                truncated=_flag(obj, "truncated"),
            )
        )
    return size, objects


def _flag(obj: ET.Element, tag: str) -> bool:
    text = (obj.findtext(tag) or "0").strip()
    try:
        return int(float(text)) == 1
    except ValueError:
        return False


def voc_record(image_id: str, image: Path, xml: Path) -> DetectionRecord:
    size, objects = parse_voc_xml(xml)
    index = {n: i for i, n in enumerate(VOC_OBJECT_CLASSES)}
    unknown = sorted({o.name for o in objects} - set(index))
    if unknown:
        raise DatasetError(f"unknown VOC class(es) {unknown} in {xml}")
    boxes = np.array(
        [(o.box[0] - 1, o.box[1] - 1, o.box[2], o.box[3]) for o in objects], dtype=np.float32
    ).reshape(-1, 4)
    difficult = np.array([o.difficult for o in objects], dtype=bool)
    truncated = np.array([o.truncated for o in objects], dtype=bool)
    return DetectionRecord(
        image_id=image_id,
        image=image,
        boxes=boxes,
        labels=np.array([index[o.name] for o in objects], dtype=np.int64),
        hard=difficult | truncated,
        size=size,
        extra={"difficult": difficult, "truncated": truncated},
    )


class VOCDetection(DetectionDataset):
    """VOC2007 / VOC2012 ``trainval`` boxes for object discovery (CorLoc).

    ``ds[i] -> (image, dict(boxes, hard, labels, image_id, difficult, truncated))`` with labels
    indexing the 20 object classes in ``ds.class_names`` (aeroplane = 0).
    """

    def __init__(
        self,
        root: str | Path,
        year: int = 2012,
        split: str = "trainval",
        *,
        no_hard: bool = False,
        transform: Callable | None = None,
        on_error: str = "raise",
        validate: bool = False,
    ):
        voc = find_voc_dir(root, year)
        require_dir(voc / "JPEGImages", f"VOC{year} JPEGImages", layouts.VOC)
        ann_dir = require_dir(voc / "Annotations", f"VOC{year} Annotations", layouts.VOC)
        ids = read_id_list(
            voc / "ImageSets" / "Main" / f"{split}.txt",
            f"VOC{year} image set '{split}'",
            layouts.VOC,
        )
        self.split = split
        self.year = int(year)
        self._init_errors(on_error)
        records = []
        present = listdir_set(ann_dir)
        for i in ids:
            xml = ann_dir / f"{i}.xml"
            try:
                if xml.name not in present:
                    raise DatasetError(f"annotation missing: {xml}")
                records.append(voc_record(i, voc / "JPEGImages" / f"{i}.jpg", xml))
            except DatasetError as e:
                self._errors.report(str(e))
        super().__init__(
            records,
            name=f"voc{str(year)[-2:]}",
            class_names=VOC_OBJECT_CLASSES,
            root=Path(root),
            no_hard=no_hard,
            transform=transform,
            on_error=on_error,
            validate=validate,
        )
