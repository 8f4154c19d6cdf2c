"""Base classes shared by the readers: sample lists, subsets, and the two error policies.

``on_error='raise'`` (default): a missing, corrupt or inconsistent sample raises DatasetError
naming its path -- at construction for what can be seen cheaply (missing files; everything when
``validate=True``), otherwise when the sample is read.

``on_error='skip'``: such samples are dropped and counted in ``ds.skipped`` (the reasons in
``ds.problems``). Missing files are dropped at construction; with ``validate=True`` every sample
is decoded at construction, so the dataset that remains is exactly the readable part (use this
for evaluation). Without it, a sample found bad when read is replaced by the next readable one
(with a warning), which keeps a training DataLoader running; ``ds.skipped`` then counts per
process, i.e. per DataLoader worker.

The datasets are plain sequence classes (``__len__``/``__getitem__``), which is all that
``torch.utils.data.DataLoader`` needs, so importing them does not import torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .classes import IGNORE_INDEX
from .errors import DatasetError
from .files import listdir_set, load_label_counted, load_rgb

ON_ERROR = ("raise", "skip")


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def subset_indices(n: int, subset: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``subset`` items (all when None or >= n).

    Sorted so that the subset keeps the dataset's order; the choice depends only on (n, subset,
    seed), so the same copy of a dataset always gives the same subset.
    """
    if subset is None or subset >= n:
        return np.arange(n)
    if subset <= 0:
        raise ValueError(f"subset must be positive, got {subset}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=subset, replace=False))


def missing_files(paths: Sequence[Path]) -> list[Path]:
    """Paths that do not exist, testing membership in one listing per directory."""
    listings: dict[Path, set[str]] = {}
    out = []
    for p in paths:
        names = listings.get(p.parent)
        if names is None:
            names = listings[p.parent] = listdir_set(p.parent)
        if p.name not in names:
            out.append(p)
    return out


@dataclass
class _Errors:
    """Bookkeeping of the skip policy."""

    on_error: str
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    bad: set[int] = field(default_factory=set)

    def report(self, message: str) -> None:
        if self.on_error == "raise":
            raise DatasetError(message)
        self.skipped += 1
        self.problems.append(message)


class _ReaderBase:
    name: str = ""
    ids: list[str]

    def _init_errors(self, on_error: str) -> None:
        # A subclass may have recorded problems (e.g. unparseable annotations) before calling
        # the base initialiser; keep them.
        if not hasattr(self, "_errors"):
            self._errors = _Errors(check_on_error(on_error))

    @property
    def on_error(self) -> str:
        return self._errors.on_error

    @property
    def skipped(self) -> int:
        """Samples dropped or replaced because they were missing or unreadable."""
        return self._errors.skipped

    @property
    def problems(self) -> list[str]:
        """One message per skipped sample, each naming the file."""
        return self._errors.problems

    def __len__(self) -> int:
        return len(self.ids)

    def _get(self, i: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Any:
        return self._fetch(i, self._get)

    def _fetch(self, i: int, get: Callable[[int], Any]) -> Any:
        """``get(i)`` under the error policy (``skip``: the next readable sample instead)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} of length {n}")
        i %= n
        if self.on_error == "raise":
            return get(i)
        for k in range(n):
            j = (i + k) % n
            if j in self._errors.bad:
                continue
            try:
                return get(j)
            except DatasetError as e:
                self._errors.bad.add(j)
                self._errors.report(str(e))
                warnings.warn(f"skipping unreadable sample: {e}", stacklevel=2)
        raise DatasetError(f"{self.name}: no readable sample left ({self.skipped} skipped)")


class SegmentationDataset(_ReaderBase):
    """Images with per-pixel class ids: ``ds[i] -> (PIL RGB image, HxW uint8 mask)``.

    Mask values are class indices ``0..num_classes-1`` and ``ignore_index`` (255). Subclasses
    list (id, image path, mask path) triples and give the lookup table from the raw values
    stored in their PNGs to class indices.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        samples: Sequence[tuple[str, Path, Path]],
        *,
        name: str,
        class_names: Sequence[str],
        lut: np.ndarray,
        ignore_raw: Sequence[int] = (IGNORE_INDEX,),
        root: Path,
        split: str,
        transform: Callable | None = None,
        subset: int | None = None,
        subset_seed: int = 0,
        on_error: str = "raise",
        validate: bool = False,
        palette: np.ndarray | None = None,
    ):
        self._init_errors(on_error)
        self.name = name
        self.root = Path(root)
        self.split = split
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.transform = transform
        self.lut = lut
        self.palette = palette
        # Raw values that are legitimate in the PNGs: every mapped id plus the ignore markers.
        self.valid_raw = frozenset(np.flatnonzero(lut != IGNORE_INDEX).tolist()) | set(ignore_raw)
        self._valid_table = np.zeros(256, bool)
        self._valid_table[sorted(self.valid_raw)] = True
        keep = subset_indices(len(samples), subset, subset_seed)
        rows = [samples[k] for k in keep]
        rows = self._drop_missing(rows)
        self.ids = [r[0] for r in rows]
        self._images = [Path(r[1]) for r in rows]
        self._masks = [Path(r[2]) for r in rows]
        if validate:
            self._validate_all()

    def _drop_missing(self, rows: list[tuple[str, Path, Path]]) -> list[tuple[str, Path, Path]]:
        gone = set(missing_files([Path(r[1]) for r in rows] + [Path(r[2]) for r in rows]))
        if not gone:
            return rows
        if self.on_error == "raise":
            shown = "\n".join(f"  {p}" for p in sorted(gone)[:10])
            more = f"\n  ... and {len(gone) - 10} more" if len(gone) > 10 else ""
            raise DatasetError(
                f"{self.name} ({self.split}): {len(gone)} listed file(s) missing:\n{shown}{more}\n"
                "(pass on_error='skip' to drop these samples)"
            )
        kept = []
        for r in rows:
            lost = [p for p in (Path(r[1]), Path(r[2])) if p in gone]
            if lost:
                self._errors.report(f"missing file for {r[0]}: {lost[0]}")
            else:
                kept.append(r)
        return kept

    def _validate_all(self) -> None:
        good = []
        for i in range(len(self.ids)):
            try:
                self.read_raw(i)
                good.append(i)
            except DatasetError as e:
                self._errors.report(str(e))
        self.ids = [self.ids[i] for i in good]
        self._images = [self._images[i] for i in good]
        self._masks = [self._masks[i] for i in good]

    def image_path(self, i: int) -> Path:
        return self._images[i]

    def mask_path(self, i: int) -> Path:
        return self._masks[i]

    def read_raw(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """Image and the label PNG's raw values, checked to have the same size."""
        img, raw, _ = self._read_raw_counted(i)
        return img, raw

    def _read_raw_counted(self, i: int) -> tuple[Image.Image, np.ndarray, int]:
        """``read_raw`` and the pixels of an RGB mask whose colour is not in the palette."""
        img = load_rgb(self._images[i])
        raw, stray = load_label_counted(self._masks[i], self.palette)
        if raw.shape != (img.height, img.width):
            raise DatasetError(
                f"mask {self._masks[i]} is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image "
                f"{self._images[i]} is {img.width}x{img.height}"
            )
        return img, raw, stray

    def unknown_pixels(self, raw: np.ndarray) -> int:
        """Pixels whose raw value is outside the label set (they read as ignore)."""
        return int(raw.size - np.count_nonzero(self._valid_table[raw]))

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """Image and class-index mask of sample i, without transform or skip policy."""
        img, raw = self.read_raw(i)
        return img, self.lut[raw]

    def _get(self, i: int) -> Any:
        img, mask = self.load(i)
        if self.transform is not None:
            return self.transform(img, mask)
        return img, mask

    def _get_counted(self, i: int) -> Any:
        img, raw, stray = self._read_raw_counted(i)
        # a stray colour reads as 255, a valid value: counted apart
        unknown = self.unknown_pixels(raw) + stray
        mask = self.lut[raw]
        if self.transform is not None:
            img, mask = self.transform(img, mask)
        return img, mask, unknown

    def sample_counted(self, i: int) -> tuple[Any, Any, int]:
        """``(*ds[i], pixels of its mask outside the label set)``: values that are no class
        and not an ignore marker, and colours of an RGB mask not in the palette. They read as
        ignore, so a training mask of wrong values silently trains on nothing; callers count
        them (``eval.feature_cache``)."""
        return self._fetch(i, self._get_counted)

    def check_sample(self, i: int) -> tuple[list[str], set[int] | None]:
        """(problems, class indices present) of sample i; never raises for bad data.

        Classes are None when the sample cannot be read. Label values outside the class set are
        a problem worth reporting but leave the sample usable (they read as ignore).
        """
        try:
            _, raw, stray = self._read_raw_counted(i)
        except DatasetError as e:
            return [str(e)], None
        values = set(np.unique(raw).tolist())
        unexpected = sorted(values - self.valid_raw)
        problems = []
        if unexpected:
            n = self.unknown_pixels(raw)
            problems.append(
                f"mask {self._masks[i]} holds values {unexpected[:10]} outside the label set "
                f"of {self.name} in {n} pixels ({100 * n / raw.size:.3g} %; read as ignore)"
            )
        if stray:
            problems.append(
                f"mask {self._masks[i]} has {stray} pixels ({100 * stray / raw.size:.3g} %) of "
                f"colours not in the {self.name} palette (read as ignore)"
            )
        classes = {int(self.lut[v]) for v in values} - {IGNORE_INDEX}
        return problems, classes

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes}, root={str(self.root)!r})"
        )


@dataclass
class DetectionRecord:
    """Ground truth of one image, in the TokenCut/LOST protocol's continuous coordinates."""

    image_id: str
    image: Path
    boxes: np.ndarray  # (K, 4) float32 x0, y0, x1, y1
    labels: np.ndarray  # (K,) int64 index into the dataset's class_names
    hard: np.ndarray  # (K,) bool
    size: tuple[int, int] | None = None  # (width, height) as annotated, when known
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def keep_boxes(rec: DetectionRecord, keep: np.ndarray) -> DetectionRecord:
    return DetectionRecord(
        rec.image_id,
        rec.image,
        rec.boxes[keep],
        rec.labels[keep],
        rec.hard[keep],
        rec.size,
        {k: v[keep] for k, v in rec.extra.items()},
    )


class DetectionDataset(_ReaderBase):
    """Images with ground-truth boxes: ``ds[i] -> (PIL RGB image, target dict)``.

    ``target = dict(boxes=(K,4) float32 xyxy, hard=(K,) bool, labels=(K,) int64,
    image_id=str)`` plus dataset-specific arrays. Boxes are in the object-discovery protocol's
    coordinates (see the subclass). ``no_hard=True`` drops hard boxes and then the images left
    without any box. ``transform``, if given, is applied to the image only, so it must not move
    pixels (normalise, pad bottom/right, to-tensor): the boxes stay in original coordinates.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        *,
        name: str,
        class_names: Sequence[str],
        root: Path,
        no_hard: bool = False,
        transform: Callable | None = None,
        on_error: str = "raise",
        validate: bool = False,
    ):
        self._init_errors(on_error)
        self.name = name
        self.root = Path(root)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.no_hard = no_hard
        self.transform = transform
        recs = list(records)
        if no_hard:
            recs = [keep_boxes(r, ~r.hard) for r in recs]
            recs = [r for r in recs if len(r.boxes)]
        recs = self._drop_missing(recs)
        self.records = recs
        self.ids = [r.image_id for r in recs]
        if validate:
            self._validate_all()

    def _drop_missing(self, recs: list[DetectionRecord]) -> list[DetectionRecord]:
        gone = set(missing_files([r.image for r in recs]))
        if not gone:
            return recs
        if self.on_error == "raise":
            shown = "\n".join(f"  {p}" for p in sorted(gone)[:10])
            more = f"\n  ... and {len(gone) - 10} more" if len(gone) > 10 else ""
            raise DatasetError(
                f"{self.name}: {len(gone)} image(s) missing:\n{shown}{more}\n"
                "(pass on_error='skip' to drop these images)"
            )
        for r in recs:
            if r.image in gone:
                self._errors.report(f"image missing: {r.image}")
        return [r for r in recs if r.image not in gone]

    def _validate_all(self) -> None:
        good = []
        for i in range(len(self.records)):
            problems, _ = self.check_sample(i)
            for p in problems:
                self._errors.report(p)
            if not problems:
                good.append(i)
        self.records = [self.records[i] for i in good]
        self.ids = [r.image_id for r in self.records]

    @property
    def num_boxes(self) -> int:
        return int(sum(len(r.boxes) for r in self.records))

    def image_path(self, i: int) -> Path:
        return self.records[i].image

    def target(self, i: int) -> dict[str, Any]:
        """Ground truth of image i without reading the image."""
        r = self.records[i]
        out = {"boxes": r.boxes, "hard": r.hard, "labels": r.labels, "image_id": r.image_id}
        out.update(r.extra)
        return out

    def load(self, i: int) -> Image.Image:
        img = load_rgb(self.records[i].image)
        size = self.records[i].size
        if size is not None and img.size != tuple(size):
            raise DatasetError(
                f"image {self.records[i].image} is {img.width}x{img.height} but its annotation "
                f"says {size[0]}x{size[1]}"
            )
        return img

    def _get(self, i: int) -> Any:
        img = self.load(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.target(i)

    def check_sample(self, i: int) -> tuple[list[str], list[str]]:
        """(problems, warnings) of image i. Boxes outside the image are only warned about:
        real VOC has a few, and the protocol uses them as they are."""
        try:
            img = self.load(i)
        except DatasetError as e:
            return [str(e)], []
        r = self.records[i]
        warns = []
        if len(r.boxes):
            b = r.boxes
            bad = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
            out = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > img.width) | (b[:, 3] > img.height)
            if bad.any():
                warns.append(f"{r.image_id}: {int(bad.sum())} empty or inverted box(es)")
            if out.any():
                warns.append(f"{r.image_id}: {int(out.sum())} box(es) extend outside the image")
        return [], warns

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, boxes={self.num_boxes}, "
            f"no_hard={self.no_hard}, root={str(self.root)!r})"
        )
