"""ADE20K scene parsing (ADEChallengeData2016): 150 classes, PNG value v -> class v - 1, and
value 0 ("other objects") -> ignore (255), as in the benchmark's reduce-zero-label convention."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import layouts
from .base import SegmentationDataset
from .classes import ADE20K_CLASSES, ade20k_lut
from .errors import DatasetError, first_existing, require_dir, with_layout
from .files import stems_with_ext

ADE20K_SPLITS = {"train": "training", "val": "validation"}


def find_ade_dir(root: str | Path) -> Path:
    root = Path(root)
    candidates = [root / "ADEChallengeData2016", root]
    for c in candidates:
        if (c / "images").is_dir():
            return c
    return first_existing([c / "images" for c in candidates], "ADE20K", layouts.ADE20K).parent


class ADE20KSegmentation(SegmentationDataset):
    """``split``: 'train' (20,210 images) or 'val' (2,000); 'training'/'validation' also work."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable | None = None,
        *,
        subset: int | None = None,
        subset_seed: int = 0,
        on_error: str = "raise",
        validate: bool = False,
    ):
        folder = ADE20K_SPLITS.get(split, split)
        if folder not in ADE20K_SPLITS.values():
            raise ValueError(f"ADE20K split must be 'train' or 'val', got {split!r}")
        ade = find_ade_dir(root)
        img_dir = require_dir(ade / "images" / folder, f"ADE20K images/{folder}", layouts.ADE20K)
        ann_dir = require_dir(
            ade / "annotations" / folder, f"ADE20K annotations/{folder}", layouts.ADE20K
        )
        ids = stems_with_ext(img_dir, (".jpg", ".jpeg"))
        if not ids:
            raise DatasetError(with_layout(f"no .jpg images in {img_dir}", layouts.ADE20K))
        samples = [(i, img_dir / f"{i}.jpg", ann_dir / f"{i}.png") for i in ids]
        super().__init__(
            samples,
            name="ade20k",
            class_names=ADE20K_CLASSES,
            lut=ade20k_lut(),
            ignore_raw=(0,),
            root=Path(root),
            split="train" if folder == "training" else "val",
            transform=transform,
            subset=subset,
            subset_seed=subset_seed,
            on_error=on_error,
            validate=validate,
        )
