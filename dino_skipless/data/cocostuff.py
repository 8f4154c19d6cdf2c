"""COCO-Stuff-164k: the 171 classes that occur (80 things + 91 stuff) as 0..170, or 27 coarse.

The stuffthingmaps PNGs store 0-indexed COCO ids 0..181 with 255 = unlabeled; the 11 thing ids
COCO never annotated do not occur, so the used ids are renumbered 0..170 in increasing order
(``classes.COCOSTUFF_USED_RAW``). ``coarse=True`` maps each class to its supercategory (the
27-class "cocostuff27" set of IIC/PiCIE/STEGO). mmseg's converted ``*_labelTrainIds.png`` (already
0..170) are read when the stuffthingmaps folder is absent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import layouts
from .base import SegmentationDataset
from .classes import COCOSTUFF_CLASSES, COCOSTUFF_COARSE_CLASSES, cocostuff_lut
from .errors import DatasetError, require_dir, with_layout
from .files import stems_with_ext

COCOSTUFF_SPLITS = {"train": "train2017", "val": "val2017"}
_MAP_DIRS = ("stuffthingmaps_trainval2017", "stuffthingmaps")


def _mask_dir(root: Path, folder: str) -> tuple[Path, str]:
    """(directory, file suffix) of the label maps; the suffix tells which id space they use."""
    for d in _MAP_DIRS:
        if (root / d / folder).is_dir():
            return root / d / folder, ".png"
    if (root / "annotations" / folder).is_dir():
        return root / "annotations" / folder, "_labelTrainIds.png"
    tried = ", ".join(str(root / d / folder) for d in (*_MAP_DIRS, "annotations"))
    raise DatasetError(
        with_layout(f"COCO-Stuff label maps not found; looked in: {tried}", layouts.COCOSTUFF)
    )


class COCOStuffSegmentation(SegmentationDataset):
    """``split``: 'train' (118k, train2017) or 'val' (5k, val2017)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable | None = None,
        *,
        coarse: bool = False,
        subset: int | None = None,
        subset_seed: int = 0,
        on_error: str = "raise",
        validate: bool = False,
    ):
        folder = COCOSTUFF_SPLITS.get(split, split)
        if folder not in COCOSTUFF_SPLITS.values():
            raise ValueError(f"COCO-Stuff split must be 'train' or 'val', got {split!r}")
        root = Path(root)
        require_dir(root, "COCO-Stuff root", layouts.COCOSTUFF)
        img_dir = require_dir(
            root / "images" / folder, f"COCO-Stuff images/{folder}", layouts.COCOSTUFF
        )
        mask_dir, suffix = _mask_dir(root, folder)
        ids = stems_with_ext(img_dir, (".jpg", ".jpeg"))
        if not ids:
            raise DatasetError(with_layout(f"no .jpg images in {img_dir}", layouts.COCOSTUFF))
        samples = [(i, img_dir / f"{i}.jpg", mask_dir / f"{i}{suffix}") for i in ids]
        self.coarse = coarse
        super().__init__(
            samples,
            name="cocostuff27" if coarse else "cocostuff",
            class_names=COCOSTUFF_COARSE_CLASSES if coarse else COCOSTUFF_CLASSES,
            lut=cocostuff_lut(coarse=coarse, already_fine=suffix != ".png"),
            root=root,
            split="train" if folder == "train2017" else "val",
            transform=transform,
            subset=subset,
            subset_seed=subset_seed,
            on_error=on_error,
            validate=validate,
        )
