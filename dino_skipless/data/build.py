"""Construct a reader by dataset name, as the evaluation stages' ``--dataset`` flags spell it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .ade20k import ADE20KSegmentation
from .base import DetectionDataset, SegmentationDataset
from .coco20k import COCO20kDetection
from .cocostuff import COCOStuffSegmentation
from .voc import VOCDetection, VOCSegmentation

SEGMENTATION_NAMES = ("voc", "ade20k", "cocostuff", "cocostuff27")
DETECTION_NAMES = ("voc07", "voc12", "coco20k")
_SEG_ALIASES = {
    "voc12": "voc",
    "voc2012": "voc",
    "ade": "ade20k",
    "coco-stuff": "cocostuff",
    "coco_stuff": "cocostuff",
    "cocostuff164k": "cocostuff",
}
_DET_ALIASES = {"voc2007": "voc07", "voc2012": "voc12", "coco": "coco20k"}


def build_segmentation_dataset(
    name: str, root: str | Path, split: str, **kw: Any
) -> SegmentationDataset:
    """``name``: 'voc' | 'ade20k' | 'cocostuff' ('cocostuff27' = cocostuff with coarse=True).
    Keyword arguments go to the reader (transform, subset, subset_seed, coarse, on_error,
    validate)."""
    key = _SEG_ALIASES.get(name.lower(), name.lower())
    if key == "voc":
        return VOCSegmentation(root, split, **kw)
    if key == "ade20k":
        return ADE20KSegmentation(root, split, **kw)
    if key in ("cocostuff", "cocostuff27"):
        kw.setdefault("coarse", key == "cocostuff27")
        return COCOStuffSegmentation(root, split, **kw)
    raise ValueError(f"unknown segmentation dataset {name!r}; expected one of {SEGMENTATION_NAMES}")


def build_detection_dataset(
    name: str, root: str | Path, no_hard: bool = False, **kw: Any
) -> DetectionDataset:
    """``name``: 'voc07' | 'voc12' | 'coco20k'. Keyword arguments go to the reader."""
    key = _DET_ALIASES.get(name.lower(), name.lower())
    if key in ("voc07", "voc12"):
        return VOCDetection(root, year=2007 if key == "voc07" else 2012, no_hard=no_hard, **kw)
    if key == "coco20k":
        return COCO20kDetection(root, no_hard=no_hard, **kw)
    raise ValueError(f"unknown detection dataset {name!r}; expected one of {DETECTION_NAMES}")
