"""Check a copy of a dataset: ``python -m dino_skipless.data.check --dataset voc --root PATH``.

Reads every image and mask of the requested splits through the same readers the pipeline uses,
and reports counts (images, masks, boxes after the protocol's filtering, classes present) and
every problem found (missing, corrupt or truncated files, masks whose size differs from their
image, label values outside the class set). ``--json PATH`` writes the report as JSON.

Exit status: 0 when the copy is usable (at least one image, at most ``--tolerate`` problems),
1 when problems were found, 2 when the layout itself is wrong (missing root, split list or
annotation file; the message shows the expected layout).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..cli import ArgumentParser, cli_main, flag
from ..outdir import check_out_file
from ..ranges import NON_NEGATIVE
from .ade20k import ADE20KSegmentation
from .base import DetectionDataset, SegmentationDataset
from .coco20k import COCO20kDetection
from .cocostuff import COCOStuffSegmentation
from .errors import DatasetError
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
        rep.boxes += len(t["boxes"])
        rep.class_names |= {ds.class_names[c] for c in t["labels"].tolist()}
    return _finish(rep)


def check_imagefolder(ds: ImageFolderDataset, quick: bool = False) -> PartReport:
    rep = PartReport()
    for i in _progress(len(ds), "imagefolder"):
        problems = [] if quick else ds.check_sample(i)
        rep.problems += problems
        if not problems:
            rep.image_paths.add(str(ds.image_path(i)))
            rep.class_names.add(ds.classes[ds.targets[i]])
    return _finish(rep)


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
        warnings=[w for p in parts.values() for w in p.warnings],
        parts={
            k: {f: v for f, v in asdict(p).items() if not isinstance(v, set)}
            for k, p in parts.items()
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
    args = p.parse_args(argv)
    if args.json:  # before the check, which can take long on a real dataset
        check_out_file(args.json, "--json")
    report, status = run_check(args)
    _print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n", "utf-8")
    return status


if __name__ == "__main__":
    sys.exit(main())
