"""COCO20k: the 19,817 COCO-2014 train images of LOST/TokenCut's object-discovery benchmark.

Protocol (LOST's ``extract_gt_COCO``): boxes of ``instances_train2014.json``, ``iscrowd``
annotations dropped, ``[x, y, x + w, y + h]`` each rounded to the nearest int (Python's
``round``, halves to even). Images whose every box is crowd (or that have none) stay in the set
with an empty ``(0, 4)`` box array -- the evaluator counts them as misses -- unless
``no_hard=True``, which drops them, as LOST does when run with ``--no_hard``.

The image list is ``ROOT/coco_20k_filenames.txt`` when present (the synthetic writer puts one
there), else ``file_list=``, else the list shipped with the package (package data, read
through ``importlib.resources``, so it is there after any install).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import layouts
from .base import DetectionDataset, DetectionRecord
from .errors import DatasetError, require_file, with_layout
from .files import read_id_list

LIST_NAME = "coco_20k_filenames.txt"
# a plain path for an installed package (not a zip), which is how read_id_list opens it
SHIPPED_LIST = importlib.resources.files(__package__) / LIST_NAME
ANNOTATION_FILE = Path("annotations") / "instances_train2014.json"


def find_file_list(root: Path, file_list: str | Path | None = None) -> Path:
    if file_list is not None:
        return require_file(Path(file_list), "COCO20k file list (file_list=)")
    for p in (root / LIST_NAME, SHIPPED_LIST):
        if p.is_file():
            return p
    raise DatasetError(
        f"COCO20k file list not found: neither {root / LIST_NAME} nor the shipped "
        f"{SHIPPED_LIST} exists (pass file_list= to point at a copy)"
    )


def find_image_base(root: Path) -> Path:
    """The folder that the list's ``train2014/...`` entries are relative to."""
    for base in (root / "images", root):
        if (base / "train2014").is_dir():
            return base
    raise DatasetError(
        with_layout(
            f"COCO train2014 images not found: neither {root / 'images' / 'train2014'} nor "
            f"{root / 'train2014'} is a directory.",
            layouts.COCO20K,
        )
    )


def load_coco(path: Path):
    """A pycocotools COCO index of ``path``, its progress prints silenced."""
    try:
        from pycocotools.coco import COCO
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DatasetError("COCO20k needs pycocotools: pip install pycocotools") from e
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(os.fspath(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"annotation file {path} is not valid JSON: {e}") from e
    except (KeyError, TypeError, AssertionError) as e:
        raise DatasetError(f"annotation file {path} is not in COCO format: {e!r}") from e


def lost_box(bbox: list[float]) -> list[int]:
    x, y, w, h = (float(v) for v in bbox)
    return [int(round(v)) for v in (x, y, x + w, y + h)]


class COCO20kDetection(DetectionDataset):
    """``ds[i] -> (image, dict(boxes, hard, labels, image_id, category_id))``.

    ``labels`` index ``ds.class_names`` (the annotation file's categories sorted by id);
    ``category_id`` keeps COCO's own ids; ``hard`` is all False (COCO has no such flag);
    ``image_id`` is the file name without extension.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        file_list: str | Path | None = None,
        annotation_file: str | Path | None = None,
        no_hard: bool = False,
        transform: Callable | None = None,
        on_error: str = "raise",
        validate: bool = False,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(
                with_layout(f"COCO20k root not found: {root} is not a directory.", layouts.COCO20K)
            )
        ann_path = Path(annotation_file) if annotation_file else root / ANNOTATION_FILE
        require_file(ann_path, "COCO instances_train2014.json", layouts.COCO20K)
        self.file_list = find_file_list(root, file_list)
        entries = read_id_list(self.file_list, "COCO20k file list")
        base = find_image_base(root)
        coco = load_coco(ann_path)
        cat_ids = sorted(coco.cats)
        self.category_ids = cat_ids
        cat_index = {c: i for i, c in enumerate(cat_ids)}
        by_name = {img["file_name"]: img for img in coco.dataset.get("images", [])}
        self._init_errors(on_error)
        records = []
        for entry in entries:
            fname = os.path.basename(entry)
            info = by_name.get(fname) or coco.imgs.get(_id_from_name(fname))
            if info is None:
                self._errors.report(f"{entry} (from {self.file_list}) is not in {ann_path}")
                continue
            anns = [a for a in coco.imgToAnns.get(info["id"], []) if not a.get("iscrowd", 0)]
            cats = np.array([a["category_id"] for a in anns], dtype=np.int64)
            records.append(
                DetectionRecord(
                    image_id=os.path.splitext(fname)[0],
                    image=base / entry,
                    boxes=np.array([lost_box(a["bbox"]) for a in anns], np.float32).reshape(-1, 4),
                    labels=np.array([cat_index[c] for c in cats.tolist()], dtype=np.int64),
                    hard=np.zeros(len(anns), dtype=bool),
                    size=(int(info["width"]), int(info["height"])) if "width" in info else None,
                    extra={"category_id": cats},
                )
            )
        super().__init__(
            records,
            name="coco20k",
            class_names=[coco.cats[c]["name"] for c in cat_ids],
            root=root,
            no_hard=no_hard,
            transform=transform,
            on_error=on_error,
            validate=validate,
        )


def _id_from_name(fname: str) -> int:
    """COCO_train2014_000000560992.jpg -> 560992 (how LOST maps its list to image ids)."""
    try:
        return int(os.path.splitext(fname)[0].split("_")[-1])
    except ValueError:
        return -1
