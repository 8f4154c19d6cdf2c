"""Synthetic datasets written in the real datasets' on-disk formats: the generator.

``generate(out, fmt, n, size, seed, vary=...)`` (command line: ``python -m
dino_skipless.data.synthetic``) writes ``out`` so that it is directly a ``--root`` for the
matching reader (layouts in ``layouts.py``), with a manifest (``write_manifest``) that the cache
(``cache.py``) reads back. Output depends only on the arguments: the same
seed gives byte-identical files. ``--size`` is the image side: square SxS images by default;
``--vary`` draws each side from [0.75 S, 1.25 S] instead.

What each format gets (``n`` scenes each; see ``scenes.py`` for the scenes):

* ``voc``: ``VOCdevkit/VOC2012`` -- JPEGs, XML boxes (difficult: small or mostly occluded;
  truncated: touching the border), palette ``SegmentationClass`` PNGs with a 255 band on object
  contours, ``SegmentationClassAug`` (SBD-style, no band on SBD-only images), ImageSets with
  train/val/trainval/trainaug (a quarter of the images are detection/SBD-only) -- and
  ``VOCdevkit/VOC2007`` (another ``n`` scenes, detection only). Stuff is VOC background.
* ``ade20k``: ``ADEChallengeData2016`` with 1-based grey PNGs; an unlabelled region (value 0)
  appears in about a quarter of the images. Every fifth image is validation.
* ``cocostuff``: ``images/{train,val}2017`` and ``stuffthingmaps_trainval2017`` with the real
  0-indexed ids (things and stuff, 255 unlabelled).
* ``coco20k``: ``train2014`` JPEGs, ``annotations/instances_train2014.json`` (all 80 categories;
  polygons, crowd objects as RLE) and ``coco_20k_filenames.txt`` listing nine in ten images.
  Image 1 has no annotation and image 2 only a crowd one.
* ``imagefolder``: ``<kind>/<kind>_NNNNNN.jpg``, one folder per object kind (surface pattern);
  each image is its folder's pattern filling the frame, in random colours, period, orientation
  and shading (a DTD-like texture set: the pretraining images and the k-NN classes).

``synthetic_root(fmt, ...)`` generates once into a cache and returns the root.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .classes import (
    ADE20K_CLASSES,
    COCO_CATEGORIES,
    COCOSTUFF_RAW_NAMES,
    IGNORE_INDEX,
    VOC_CLASSES,
    VOC_OBJECT_CLASSES,
    ade20k_lut,
    cocostuff_lut,
    voc_palette,
)
from .scenes import (
    THING_KINDS,
    Scene,
    object_boundaries,
    render_scene,
    render_texture,
    semantic_map,
)

FORMATS = ("voc", "ade20k", "cocostuff", "coco20k", "imagefolder")
GENERATOR_VERSION = 4
MANIFEST = "synthetic.json"
DEFAULT_N = 100
DEFAULT_SIZE = 128

# Real class names standing in for the generic scene kinds (STUFF_KINDS / THING_KINDS order).
VOC_THINGS = ("aeroplane", "bird", "boat", "car", "cat", "person")
ADE_STUFF = ("sky", "grass", "water", "wall", "road")
ADE_THINGS = ("person", "car", "chair", "lamp", "boat", "bottle")
COCOSTUFF_STUFF = ("sky-other", "grass", "sea", "wall-brick", "road")
# toothbrush (raw 89) sits above ten of the unused ids, so it exercises the 182 -> 171 mapping.
COCO_THINGS = ("person", "car", "cat", "airplane", "kite", "toothbrush")

# Seed streams: each dataset part draws its scenes from its own sequence.
_STREAM = {
    "voc12": 2012,
    "voc07": 2007,
    "ade20k": 150,
    "cocostuff": 164,
    "coco20k": 2014,
    "imagefolder": 1,
}


@dataclass
class SyntheticTruth:
    """What the writer put on disk, for tests to compare readers against.

    ``masks[split][id]``: the class-index mask a reader must return (fine classes for
    COCO-Stuff), ``raw_masks[split][id]``: the values in the PNG, ``boxes[set][id]``: the
    protocol target (``boxes`` in continuous xyxy, ``labels``, ``hard``, ...), all boxes
    included; ``labels[relative path]``: ImageFolder class index.
    """

    root: Path
    fmt: str
    masks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    raw_masks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    boxes: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _rng(seed: int, stream: str, i: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _STREAM[stream], i])


def _dims(rng: np.random.Generator, size: int, vary: bool) -> tuple[int, int]:
    """(height, width)."""
    if not vary:
        return size, size
    h, w = rng.uniform(0.75, 1.25, 2) * size
    return max(16, int(round(h))), max(16, int(round(w)))


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=90)


def _save_grey_png(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8)).save(path, format="PNG")


def _save_palette_png(path: Path, mask: np.ndarray, palette: np.ndarray) -> None:
    im = Image.fromarray(mask.astype(np.uint8))
    im.putpalette(palette.astype(np.uint8).tobytes())
    im.save(path, format="PNG")


def _write_list(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


def _ids_of(names: tuple[str, ...], table: tuple[str, ...], offset: int = 0) -> list[int]:
    return [table.index(n) + offset for n in names]


# ----------------------------------------------------------------------------------------- VOC


def _voc_xml(folder: str, image_id: str, scene: Scene, segmented: bool) -> bytes:
    w, h = scene.size
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
    src = ET.SubElement(ann, "source")
    ET.SubElement(src, "database").text = "The VOC Database (synthetic)"
    ET.SubElement(src, "annotation").text = f"PASCAL {folder}"
    ET.SubElement(src, "image").text = "skipless_dino.data.synthetic"
    size = ET.SubElement(ann, "size")
    for tag, v in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(ann, "segmented").text = str(int(segmented))
    for o in scene.objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = VOC_THINGS[o.kind]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(o.truncated))
        ET.SubElement(obj, "difficult").text = str(int(o.difficult))
        bb = ET.SubElement(obj, "bndbox")
        # VOC stores 1-based inclusive pixel indices.
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), o.box):
            ET.SubElement(bb, tag).text = str(v + 1)
    ET.indent(ann, space="\t")
    return ET.tostring(ann, encoding="utf-8") + b"\n"


def _voc_target(scene: Scene) -> dict[str, np.ndarray]:
    objs = scene.objects
    labels = [VOC_OBJECT_CLASSES.index(VOC_THINGS[o.kind]) for o in objs]
    difficult = np.array([o.difficult for o in objs], dtype=bool)
    truncated = np.array([o.truncated for o in objs], dtype=bool)
    return {
        "boxes": np.array(
            [(o.box[0], o.box[1], o.box[2] + 1, o.box[3] + 1) for o in objs], np.float32
        ).reshape(-1, 4),
        "labels": np.array(labels, dtype=np.int64),
        "hard": difficult | truncated,
        "difficult": difficult,
        "truncated": truncated,
    }


def _voc_role(i: int) -> str:
    # train, val, SBD/detection-only, train: small n still gets both segmentation splits.
    return ("train", "val", "extra", "train")[i % 4]


def write_voc(out: Path, n: int, size: int, seed: int, vary: bool, truth: SyntheticTruth | None):
    palette = voc_palette()
    things = _ids_of(VOC_THINGS, VOC_CLASSES)
    for year, stream in ((2012, "voc12"), (2007, "voc07")):
        voc = out / "VOCdevkit" / f"VOC{year}"
        dirs = ["JPEGImages", "Annotations", "ImageSets/Main"]
        if year == 2012:
            dirs += ["SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"]
        for d in dirs:
            (voc / d).mkdir(parents=True, exist_ok=True)
        lists: dict[str, list[str]] = {"train": [], "val": [], "extra": []}
        for i in range(n):
            image_id = f"2012_{i:06d}" if year == 2012 else f"{i + 1:06d}"
            rng = _rng(seed, stream, i)
            h, w = _dims(rng, size, vary)
            scene = render_scene(
                rng, h, w, n_objects=(2, 4) if i == 0 else (1, 4), force_difficult=i == 0
            )
            _save_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", scene.image)
            role = _voc_role(i) if year == 2012 else "extra"
            lists[role].append(image_id)
            segmented = role != "extra"
            (voc / "Annotations" / f"{image_id}.xml").write_bytes(
                _voc_xml(f"VOC{year}", image_id, scene, segmented)
            )
            if truth is not None:
                truth.boxes.setdefault(stream, {})[image_id] = _voc_target(scene)
            if year != 2012:
                continue
            cls = semantic_map(scene, [0] * 5, things, 0)
            radius = int(round(min(h, w) / 300))
            bordered = np.where(object_boundaries(scene.instances, radius), IGNORE_INDEX, cls)
            bordered = bordered.astype(np.uint8)
            if segmented:
                _save_palette_png(voc / "SegmentationClass" / f"{image_id}.png", bordered, palette)
            aug = bordered if segmented else cls
            _save_grey_png(voc / "SegmentationClassAug" / f"{image_id}.png", aug)
            if truth is not None:
                if segmented:
                    truth.masks.setdefault(role, {})[image_id] = bordered
                    truth.masks.setdefault("trainval", {})[image_id] = bordered
                if role != "val":
                    truth.masks.setdefault("trainaug", {})[image_id] = aug
        all_ids = sorted(lists["train"] + lists["val"] + lists["extra"])
        main = voc / "ImageSets" / "Main"
        _write_list(main / "trainval.txt", all_ids)
        _write_list(main / "train.txt", all_ids[0::2])
        _write_list(main / "val.txt", all_ids[1::2])
        if year == 2012:
            seg = voc / "ImageSets" / "Segmentation"
            _write_list(seg / "train.txt", lists["train"])
            _write_list(seg / "val.txt", lists["val"])
            _write_list(seg / "trainval.txt", sorted(lists["train"] + lists["val"]))
            _write_list(seg / "trainaug.txt", sorted(lists["train"] + lists["extra"]))
    return {"images": 2 * n}


# -------------------------------------------------------------------------- ADE20K, COCO-Stuff


def _is_val(i: int) -> bool:
    return i % 5 == 1


def write_ade20k(out: Path, n: int, size: int, seed: int, vary: bool, truth):
    ade = out / "ADEChallengeData2016"
    stuff = _ids_of(ADE_STUFF, ADE20K_CLASSES, 1)
    things = _ids_of(ADE_THINGS, ADE20K_CLASSES, 1)
    lut = ade20k_lut()
    counters = {"training": 0, "validation": 0}
    for folder in counters:
        (ade / "images" / folder).mkdir(parents=True, exist_ok=True)
        (ade / "annotations" / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        folder = "validation" if _is_val(i) else "training"
        counters[folder] += 1
        image_id = f"ADE_{'val' if folder == 'validation' else 'train'}_{counters[folder]:08d}"
        rng = _rng(seed, "ade20k", i)
        h, w = _dims(rng, size, vary)
        scene = render_scene(rng, h, w, n_objects=(0, 4), force_other=i == 0)
        raw = semantic_map(scene, stuff, things, 0)
        _save_jpeg(ade / "images" / folder / f"{image_id}.jpg", scene.image)
        _save_grey_png(ade / "annotations" / folder / f"{image_id}.png", raw)
        if truth is not None:
            split = "val" if folder == "validation" else "train"
            truth.raw_masks.setdefault(split, {})[image_id] = raw
            truth.masks.setdefault(split, {})[image_id] = lut[raw]
    return {"images": n}


def write_cocostuff(out: Path, n: int, size: int, seed: int, vary: bool, truth):
    stuff = _ids_of(COCOSTUFF_STUFF, COCOSTUFF_RAW_NAMES)
    things = _ids_of(COCO_THINGS, COCOSTUFF_RAW_NAMES)
    lut = cocostuff_lut()
    for folder in ("train2017", "val2017"):
        (out / "images" / folder).mkdir(parents=True, exist_ok=True)
        (out / "stuffthingmaps_trainval2017" / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        folder = "val2017" if _is_val(i) else "train2017"
        image_id = f"{i + 1:012d}"
        rng = _rng(seed, "cocostuff", i)
        h, w = _dims(rng, size, vary)
        scene = render_scene(rng, h, w, n_objects=(0, 4), force_other=i == 0)
        raw = semantic_map(scene, stuff, things, IGNORE_INDEX)
        _save_jpeg(out / "images" / folder / f"{image_id}.jpg", scene.image)
        _save_grey_png(out / "stuffthingmaps_trainval2017" / folder / f"{image_id}.png", raw)
        if truth is not None:
            split = folder[: -len("2017")]
            truth.raw_masks.setdefault(split, {})[image_id] = raw
            truth.masks.setdefault(split, {})[image_id] = lut[raw]
    return {"images": n}


# ------------------------------------------------------------------------------------- COCO20k


def _rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE: run lengths of the column-major mask, starting with a 0-run."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def _polygons(mask: np.ndarray, box: tuple[int, int, int, int]) -> list[list[float]]:
    import cv2

    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polys = [
        [float(v) + 0.5 for v in c.reshape(-1)] for c in contours if len(c) >= 3
    ]  # pixel centres
    if not polys:
        x0, y0, x1, y1 = box
        polys = [[x0, y0, x1 + 1, y0, x1 + 1, y1 + 1, x0, y1 + 1]]
    return polys


def write_coco20k(out: Path, n: int, size: int, seed: int, vary: bool, truth):
    img_dir = out / "train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    cat_ids = [c[0] for c in COCO_CATEGORIES]
    thing_cat = [next(c[0] for c in COCO_CATEGORIES if c[1] == name) for name in COCO_THINGS]
    images, annotations, listed = [], [], []
    for i in range(n):
        coco_id = i + 1
        fname = f"COCO_train2014_{coco_id:012d}.jpg"
        rng = _rng(seed, "coco20k", i)
        h, w = _dims(rng, size, vary)
        # Image 1: no annotation at all; image 2: a single crowd annotation; image 0: several.
        bounds = {0: (2, 4), 1: (0, 0), 2: (1, 1)}.get(i, (1, 4))
        scene = render_scene(rng, h, w, n_objects=bounds, force_crowd=i in (0, 2))
        _save_jpeg(img_dir / fname, scene.image)
        images.append(
            {
                "license": 1,
                "file_name": fname,
                "coco_url": "",
                "height": h,
                "width": w,
                "date_captured": "2013-11-14 11:18:45",
                "flickr_url": "",
                "id": coco_id,
            }
        )
        boxes, labels, cats = [], [], []
        for k, o in enumerate(scene.objects):
            m = scene.instances == k + 1
            x0, y0, x1, y1 = o.box
            # Sub-pixel jitter as in real COCO boxes, small enough that rounding recovers them.
            jx, jy, jw, jh = rng.uniform(-0.3, 0.3, 4)
            bx, by = round(x0 + jx, 2), round(y0 + jy, 2)
            bbox = [bx, by, round(x1 + 1 + jw - bx, 2), round(y1 + 1 + jh - by, 2)]
            seg = {"counts": _rle_counts(m), "size": [h, w]} if o.crowd else _polygons(m, o.box)
            annotations.append(
                {
                    "segmentation": seg,
                    "area": float(o.area),
                    "iscrowd": int(o.crowd),
                    "image_id": coco_id,
                    "bbox": bbox,
                    "category_id": thing_cat[o.kind],
                    "id": len(annotations) + 1,
                }
            )
            if not o.crowd:
                boxes.append((x0, y0, x1 + 1, y1 + 1))
                cats.append(thing_cat[o.kind])
                labels.append(cat_ids.index(thing_cat[o.kind]))
        if i % 10 != 9:
            listed.append(f"train2014/{fname}")
            if truth is not None:
                truth.boxes.setdefault("coco20k", {})[fname[:-4]] = {
                    "boxes": np.array(boxes, np.float32).reshape(-1, 4),
                    "labels": np.array(labels, np.int64),
                    "hard": np.zeros(len(boxes), bool),
                    "category_id": np.array(cats, np.int64),
                }
    doc = {
        "info": {
            "description": "skipless_dino synthetic COCO20k",
            "version": "1.0",
            "year": 2014,
            "date_created": "2015-01-27 09:11:52",
        },
        "images": images,
        "licenses": [{"url": "", "id": 1, "name": "synthetic"}],
        "annotations": annotations,
        "categories": [{"supercategory": s, "id": c, "name": nm} for c, nm, s in COCO_CATEGORIES],
    }
    (out / "annotations" / "instances_train2014.json").write_text(json.dumps(doc), "utf-8")
    _write_list(out / "coco_20k_filenames.txt", listed)
    return {"images": n, "listed": len(listed), "annotations": len(annotations)}


# --------------------------------------------------------------------------------- imagefolder


def write_imagefolder(out: Path, n: int, size: int, seed: int, vary: bool, truth):
    classes = sorted(THING_KINDS)
    for name in THING_KINDS:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        kind = i % len(THING_KINDS)
        rng = _rng(seed, "imagefolder", i)
        h, w = _dims(rng, size, vary)
        rel = f"{THING_KINDS[kind]}/{THING_KINDS[kind]}_{i:06d}.jpg"
        _save_jpeg(out / rel, render_texture(rng, h, w, kind))
        if truth is not None:
            truth.labels[rel] = classes.index(THING_KINDS[kind])
    if truth is not None:
        truth.class_names = classes
    return {"images": n, "classes": len(THING_KINDS)}


_WRITERS = {
    "voc": write_voc,
    "ade20k": write_ade20k,
    "cocostuff": write_cocostuff,
    "coco20k": write_coco20k,
    "imagefolder": write_imagefolder,
}


def generate(
    out: str | Path,
    fmt: str,
    n: int = DEFAULT_N,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    *,
    vary: bool = False,
    keep_truth: bool = True,
) -> SyntheticTruth:
    """Write a synthetic dataset under ``out`` and return what was written."""
    if fmt not in _WRITERS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truth = SyntheticTruth(root=out, fmt=fmt)
    counts = _WRITERS[fmt](out, n, size, seed, vary, truth if keep_truth else None)
    truth.counts = counts
    write_manifest(out, fmt, n, size, seed, vary, counts)
    return truth


def _manifest_key(fmt: str, n: int, size: int, seed: int, vary: bool) -> dict:
    return {
        "format": fmt,
        "n": n,
        "size": size,
        "seed": seed,
        "vary": vary,
        "generator_version": GENERATOR_VERSION,
    }


def write_manifest(out: Path, fmt: str, n: int, size: int, seed: int, vary: bool, counts) -> None:
    """``out/synthetic.json``: the arguments and generator version that made ``out``."""
    manifest = {**_manifest_key(fmt, n, size, seed, vary), "counts": counts}
    (Path(out) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", "utf-8")


def manifest_matches(root: Path, fmt: str, n: int, size: int, seed: int, vary: bool) -> bool:
    """Whether ``root`` holds a complete dataset made by this generator with these arguments
    (the manifest is written last)."""
    try:
        m = json.loads((Path(root) / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return all(m.get(k) == v for k, v in _manifest_key(fmt, n, size, seed, vary).items())
