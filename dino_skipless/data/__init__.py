"""Dataset readers for the real on-disk formats, and synthetic scenes written in those formats.

Segmentation readers return ``(PIL RGB image, HxW uint8 mask)`` with class ids
``0..num_classes-1`` and 255 = ignore; detection readers return ``(PIL RGB image, target)`` with
boxes in the TokenCut/LOST protocol's coordinates; see ``datasets/README.md`` for the layouts.
"""

from .ade20k import ADE20KSegmentation
from .base import DetectionDataset, SegmentationDataset
from .build import build_detection_dataset, build_segmentation_dataset
from .cache import synthetic_root
from .classes import (
    ADE20K_CLASSES,
    COCOSTUFF_CLASSES,
    COCOSTUFF_COARSE_CLASSES,
    IGNORE_INDEX,
    VOC_CLASSES,
)
from .coco20k import COCO20kDetection
from .cocostuff import COCOStuffSegmentation
from .errors import DatasetError
from .generate import FORMATS as SYNTHETIC_FORMATS
from .imagefolder import ImageFolderDataset
from .voc import VOCDetection, VOCSegmentation

__all__ = [
    "ADE20KSegmentation",
    "ADE20K_CLASSES",
    "COCO20kDetection",
    "COCOSTUFF_CLASSES",
    "COCOSTUFF_COARSE_CLASSES",
    "COCOStuffSegmentation",
    "DatasetError",
    "DetectionDataset",
    "IGNORE_INDEX",
    "ImageFolderDataset",
    "SYNTHETIC_FORMATS",
    "SegmentationDataset",
    "VOCDetection",
    "VOCSegmentation",
    "VOC_CLASSES",
    "build_detection_dataset",
    "build_segmentation_dataset",
    "synthetic_root",
]
