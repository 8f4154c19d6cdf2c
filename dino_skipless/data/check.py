"""Check a copy of a dataset: ``python -m dino_skipless.data.check --dataset voc --root PATH``.

Reads every image and mask of the requested splits through the same readers the pipeline uses,
and reports counts (images, masks, boxes after the protocol's filtering, classes present) and
every problem found (missing, corrupt or truncated files, masks whose size differs from their
image, label values outside the class set). Warnings: the same image twice (one file by two
paths, or equal content) in one split or in a training and a held-out split, links not followed
because their folder was already walked. ``--json PATH`` writes the report as JSON. An image
folder with ``train/`` and ``val/`` (the k-NN layout) is checked as those two splits.

Exit status: 0 when the copy is usable (at least one image, at most ``--tolerate`` problems),
1 when problems were found, 2 when the layout itself is wrong (missing root, split list or
annotation file; the message shows the expected layout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..cli import ArgumentParser, cli_main, flag
from ..digest import file_digest
from ..outdir import check_out_file
from ..ranges import AT_LEAST_1, NON_NEGATIVE
from .ade20k import ADE20KSegmentation
from .base import DetectionDataset, SegmentationDataset
from .coco20k import COCO20kDetection
from .cocostuff import COCOStuffSegmentation
from .errors import DatasetError
from .files import DEFAULT_MAX_IMAGE_PIXELS, mode_note, set_max_image_pixels
from .imagefolder import ImageFolderDataset
from .voc import VOCDetection, VOCSegmentation, find_voc_dir

DATASETS = ("voc", "voc07", "voc12", "ade20k", "cocostuff", "coco20k", "imagefolder")
MAX_PRINTED = 20


@dataclass
class PartReport:
    images: int = 0
    masks: int = 0
    boxes: int = 0
    classes_present: int = 0
    class_names_present: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Paths behind the counts, so that totals over overlapping splits count each file once.
    image_paths: set[str] = field(default_factory=set, repr=False)
    mask_paths: set[str] = field(default_factory=set, repr=False)
    class_names: set[str] = field(default_factory=set, repr=False)
    # image path -> (device, inode) and -> content digest (unless --quick), for duplicates
    file_keys: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    contents: dict[str, str] = field(default_factory=dict, repr=False)


_INTERNAL = ("image_paths", "mask_paths", "class_names", "file_keys", "contents")
# Splits that must not share an image with the training splits of their dataset.
_HELD_OUT = ("val", "validation", "test")


def _progress(n: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return range(n)
    return tqdm(range(n), desc=desc, leave=False, disable=None, file=sys.stderr)


def check_segmentation(ds: SegmentationDataset, quick: bool = False) -> PartReport:
    rep = PartReport(problems=list(ds.problems))
    for i in _progress(len(ds), f"{ds.name}/{ds.split}"):
        if quick:
            problems, classes = [], set()
        else:
            problems, classes = ds.check_sample(i)
        rep.problems += problems
        if classes is None:
            continue  # unreadable
        rep.image_paths.add(str(ds.image_path(i)))
        rep.mask_paths.add(str(ds.mask_path(i)))
        rep.class_names |= {ds.class_names[c] for c in classes}
        _fingerprint(rep, ds.image_path(i), quick)
    return _finish(rep)


def check_detection(ds: DetectionDataset, quick: bool = False) -> PartReport:
    rep = PartReport(problems=list(ds.problems))
    for i in _progress(len(ds), ds.name):
        problems, warns = ([], []) if quick else ds.check_sample(i)
        rep.problems += problems
        rep.warnings += warns
        if problems:
            continue
        t = ds.target(i)
        rep.image_paths.add(str(ds.image_path(i)))
        _fingerprint(rep, ds.image_path(i), quick)
        rep.boxes += len(t["boxes"])
        rep.class_names |= {ds.class_names[c] for c in t["labels"].tolist()}
    return _finish(rep)


def check_imagefolder(ds: ImageFolderDataset, quick: bool = False) -> PartReport:
    rep = PartReport()
    rep.warnings += [
        f"link {link} not followed: its folder {target} was already walked (a loop, or a second "
        "link to one folder); its images count once"
        for link, target in ds.skipped_links
    ]
    rep.warnings += [
        f"{dup} is {kept} reached through a link: counted once" for dup, kept in ds.duplicate_files
    ]
    for i in _progress(len(ds), "imagefolder"):
        problems = [] if quick else ds.check_sample(i)
        rep.problems += problems
        if not problems:
            rep.image_paths.add(str(ds.image_path(i)))
            rep.class_names.add(ds.classes[ds.targets[i]])
            _fingerprint(rep, ds.image_path(i), quick)
    return _finish(rep)


def _fingerprint(rep: PartReport, path: Path, quick: bool) -> None:
    """Remember which file (device, inode) and, unless ``quick``, which content a readable
    image is, and warn when it is read by its range (16-bit, float)."""
    try:
        st = os.stat(path)
        rep.file_keys[str(path)] = (st.st_dev, st.st_ino)
        if not quick:
            rep.contents[str(path)] = file_digest(path)
    except OSError:
        pass  # reported by the reader
    note = None if quick else mode_note(path)
    if note:
        rep.warnings.append(note)


def duplicate_warnings(parts: dict[str, PartReport]) -> list[str]:
    """The same image twice: one file reached by two paths, or two files of equal content,
    inside one part (a seeded split may put them on both sides) or across a training and a
    held-out split of one dataset (an evaluation would score a training image)."""
    first: dict = {}
    warns = []
    names = sorted(parts, key=lambda n: n.rsplit("/", 1)[-1] in _HELD_OUT)  # held-out last
    for name in names:
        family, _, split = name.rpartition("/")
        for path in sorted(parts[name].image_paths):
            keys = [("file", parts[name].file_keys.get(path))]
            keys.append(("content", parts[name].contents.get(path)))
            for kind, key in keys:
                if key is None:
                    continue
                seen = first.setdefault((kind, family, key), (name, path))
                other_name, other_path = seen
                if other_path == path:
                    continue
                other_split = other_name.rpartition("/")[2]
                if other_name != name and not (split in _HELD_OUT) ^ (other_split in _HELD_OUT):
                    continue  # e.g. VOC train and trainaug overlap by design
                where = name if other_name == name else f"{other_name} and {name}"
                warns.append(
                    f"{other_path} and {path} are the same {kind} ({where})"
                    + ("" if other_name == name else ": an evaluation would score a training image")
                )
                break  # one warning per image
    return warns


def _finish(rep: PartReport) -> PartReport:
    rep.images = len(rep.image_paths)
    rep.masks = len(rep.mask_paths)
    rep.class_names_present = sorted(rep.class_names)
    rep.classes_present = len(rep.class_names_present)
    return rep


def _parts(args: argparse.Namespace) -> list[tuple[str, object]]:
    """(part name, zero-argument builder) for what ``--dataset``/``--split`` ask to check."""
    root, split, kw = args.root, args.split, {"on_error": "skip"}
    d = args.dataset
    if d == "voc":
        parts = []
        seg_splits = [split] if split and split != "trainval" else []
        if not split:
            seg_splits = ["train", "val"]
            voc = find_voc_dir(root, 2012)
            if (voc / "SegmentationClassAug").is_dir():
                seg_splits.append("trainaug")
        for s in seg_splits:
            parts.append((f"voc12-seg/{s}", lambda s=s: VOCSegmentation(root, s, **kw)))
        if not split or split == "trainval":
            parts.append(("voc12-det/trainval", lambda: VOCDetection(root, 2012, **kw)))
            try:
                find_voc_dir(root, 2007)
                parts.append(("voc07-det/trainval", lambda: VOCDetection(root, 2007, **kw)))
            except DatasetError:
                pass  # VOC2007 is optional alongside VOC2012
        return parts
    if d in ("voc07", "voc12"):
        year = 2007 if d == "voc07" else 2012
        s = split or "trainval"
        det = lambda: VOCDetection(root, year, s, no_hard=args.no_hard, **kw)  # noqa: E731
        return [(f"{d}-det/{s}", det)]
    if d in ("ade20k", "cocostuff"):
        cls = ADE20KSegmentation if d == "ade20k" else COCOStuffSegmentation
        extra = {"coarse": True} if d == "cocostuff" and args.coarse else {}
        return [
            (f"{d}/{s}", lambda s=s: cls(root, s, **kw, **extra))
            for s in ([split] if split else ["train", "val"])
        ]
    if d == "coco20k":
        return [("coco20k", lambda: COCO20kDetection(root, no_hard=args.no_hard, **kw))]
    if d == "imagefolder":
        if not split and (Path(root) / "train").is_dir() and (Path(root) / "val").is_dir():
            # the layout eval.knn reads as two splits
            return [
                (f"imagefolder/{s}", lambda s=s: ImageFolderDataset(Path(root) / s, **kw))
                for s in ("train", "val")
            ]
        return [("imagefolder", lambda: ImageFolderDataset(Path(root) / (split or ""), **kw))]
    raise ValueError(d)


def run_check(args: argparse.Namespace) -> tuple[dict, int]:
    report: dict = {"dataset": args.dataset, "root": str(args.root), "split": args.split}
    parts: dict[str, PartReport] = {}
    layout_error = None
    try:
        for name, build in _parts(args):
            ds = build()
            if isinstance(ds, SegmentationDataset):
                parts[name] = check_segmentation(ds, args.quick)
            elif isinstance(ds, DetectionDataset):
                parts[name] = check_detection(ds, args.quick)
            else:
                parts[name] = check_imagefolder(ds, args.quick)
    except DatasetError as e:
        layout_error = str(e)
    images = set().union(*(p.image_paths for p in parts.values())) if parts else set()
    masks = set().union(*(p.mask_paths for p in parts.values())) if parts else set()
    names = set().union(*(p.class_names for p in parts.values())) if parts else set()
    problems = [q for p in parts.values() for q in p.problems]
    if layout_error:
        problems.insert(0, layout_error)
    report.update(
        images=len(images),
        masks=len(masks),
        boxes=sum(p.boxes for p in parts.values()),
        classes_present=len(names),
        class_names_present=sorted(names),
        problems=problems,
        warnings=[w for p in parts.values() for w in p.warnings] + duplicate_warnings(parts),
        parts={
            k: {f: v for f, v in asdict(p).items() if f not in _INTERNAL} for k, p in parts.items()
        },
    )
    if layout_error:
        status = 2
    elif not images or len(problems) > args.tolerate:
        status = 1
    else:
        status = 0
    report["ok"] = status == 0
    return report, status


def _print(report: dict) -> None:
    print(f"{report['dataset']} at {report['root']}")
    for name, p in report["parts"].items():
        print(
            f"  {name:22s} images {p['images']:7d}  masks {p['masks']:7d}  boxes {p['boxes']:7d}"
            f"  classes {p['classes_present']:4d}  problems {len(p['problems'])}"
        )
    print(
        f"total: images {report['images']}, masks {report['masks']}, boxes {report['boxes']}, "
        f"classes present {report['classes_present']}; {len(report['problems'])} problem(s), "
        f"{len(report['warnings'])} warning(s)"
    )
    for q in report["problems"][:MAX_PRINTED]:
        print(f"  problem: {q}")
    if len(report["problems"]) > MAX_PRINTED:
        print(f"  ... {len(report['problems']) - MAX_PRINTED} more (see --json)")
    for w in report["warnings"][:MAX_PRINTED]:
        print(f"  warning: {w}")
    print("OK: usable" if report["ok"] else "NOT OK")


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m dino_skipless.data.check",
        description="Check a dataset copy: counts and every problem found.",
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--split", default=None, help="check only this split (default: all)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--no-hard", action="store_true", help="count boxes with hard ones dropped")
    p.add_argument("--coarse", action="store_true", help="cocostuff: report the 27 classes")
    p.add_argument("--quick", action="store_true", help="check presence only, decode nothing")
    p.add_argument(
        "--tolerate", type=flag(int, NON_NEGATIVE), default=0, help="problems allowed for exit 0"
    )
    p.add_argument(
        "--max-image-pixels",
        type=flag(int, AT_LEAST_1),
        default=None,
        metavar="N",
        help=f"decompression-bomb limit: an image above N pixels is a problem (default "
        f"{DEFAULT_MAX_IMAGE_PIXELS:,}, PIL's)",
    )
    args = p.parse_args(argv)
    if args.json:  # before the check, which can take long on a real dataset
        check_out_file(args.json, "--json")
    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)
    report, status = run_check(args)
    _print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n", "utf-8")
    return status


if __name__ == "__main__":
    sys.exit(main())
