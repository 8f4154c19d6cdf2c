"""Procedural scenes: textured "stuff" regions with curved borders, and patterned "thing" objects;
and full-frame pattern images for the class folders.

Pure numpy. A scene is stuff (2-3 of five textures, with a vertical prior so that sky tends to
sit above ground) plus 0-4 objects of six surface patterns, each with its own random colours,
silhouette, scale, rotation and position; later objects occlude earlier ones and objects near the border are
cut by it. What a format writer needs comes out of the same arrays that were painted, so masks
and boxes agree with the pixels exactly: per-pixel stuff kind, per-pixel instance index, and per
object its visible extent, area and flags.

Class cues (generator version 3; the reasons are fixed before any model is trained on them, see
README "Small-scale evaluation world"):

* thing kinds differ only in their **surface pattern** (plain, stripes, checker, dots, rings,
  zigzag), at a period of 6-9 % of the image side, i.e. visible inside one 8-px patch of the
  CPU model; their silhouette (one of six shapes), both colours of the pattern, size,
  rotation and position are drawn independently of the kind. Generator versions 1-2 had the
  opposite design (kind = shape, pattern at random): at the CPU budget not even a supervised
  ViT learns rotated silhouettes from 1,000 images (22 % top-1 after 300 steps for 6 classes,
  against 35 % and rising for patterns), so no evaluation built on them could show learning;
* objects are **large**: radius 0.14-0.30 of the image side in scenes (4-7 patches of 8 px
  across at 96 px), 0.22-0.34 alone in class folders (version 1: 2-4 patches);
* class folders (version 4) hold **full-frame patterns** (``render_texture``), like the
  describable-texture dataset DTD (striped, chequered, dotted, banded, zigzagged): every patch
  carries the label. With one object on stuff (versions 1-3) the label sat in 15-35 % of the
  image, and a supervised ViT reached only 30 % 20-NN after 400 steps of batch 64 against a
  16.5 % random-init floor; full-frame patterns give 75 % against 40 % after 200 steps;
* stuff kinds differ in **texture structure** (gradient, blades, waves, bricks, grain); their hue
  is rotated at random per region, because DINO's colour jitter is built to remove hue and a
  class told by hue would reward a network for ignoring its augmentations.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

STUFF_KINDS = ("sky", "grass", "water", "wall", "road")
THING_KINDS = ("plain", "stripes", "checker", "dots", "rings", "zigzag")  # surface patterns
SHAPES = ("disc", "square", "triangle", "star", "ellipse", "cross")  # silhouettes (nuisance)
OTHER = -1  # stuff value of the clutter region that real datasets leave unlabelled

# Added to a kind's region field, scaled from +1 at the top to -1 at the bottom of the image.
_VERTICAL_PRIOR = {"sky": 2.0, "grass": -0.8, "water": -0.8, "wall": 0.3, "road": -1.2}
_P_OTHER = 0.25
_P_CROWD = 0.08


@dataclass(frozen=True)
class SceneObject:
    kind: int  # index into THING_KINDS (the pattern)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: inclusive pixel indices of the visible part
    area: int  # visible pixels
    truncated: bool  # the visible part touches the image border
    difficult: bool  # small or mostly occluded
    crowd: bool  # annotated as a COCO crowd region by the coco20k writer


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    stuff: np.ndarray  # (H, W) int8: index into STUFF_KINDS, or OTHER
    instances: np.ndarray  # (H, W) int16: 0 = no object, k = objects[k - 1]
    objects: list[SceneObject]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.image.shape[1], self.image.shape[0]

    def dominant_kind(self) -> int:
        return max(self.objects, key=lambda o: o.area).kind


def semantic_map(scene: Scene, stuff_ids, thing_ids, other_id: int) -> np.ndarray:
    """Per-pixel ids: ``stuff_ids[kind]`` for stuff, ``thing_ids[kind]`` for objects."""
    table = np.array([*stuff_ids, other_id], dtype=np.int64)
    out = table[scene.stuff.astype(np.int64)]  # OTHER (-1) picks the last entry
    inst = scene.instances
    if scene.objects:
        kinds = np.array([o.kind for o in scene.objects], dtype=np.int64)
        things = np.asarray(thing_ids, dtype=np.int64)[kinds]
        m = inst > 0
        out[m] = things[inst[m] - 1]
    return out.astype(np.uint8)


def object_boundaries(instances: np.ndarray, radius: int = 0) -> np.ndarray:
    """Pixels on either side of an object contour, widened by ``radius`` (VOC's void band)."""
    e = np.zeros(instances.shape, dtype=bool)
    dx = instances[:, 1:] != instances[:, :-1]
    dy = instances[1:, :] != instances[:-1, :]
    e[:, 1:] |= dx
    e[:, :-1] |= dx
    e[1:, :] |= dy
    e[:-1, :] |= dy
    for _ in range(radius):
        g = e.copy()
        g[1:, :] |= e[:-1, :]
        g[:-1, :] |= e[1:, :]
        g[:, 1:] |= e[:, :-1]
        g[:, :-1] |= e[:, 1:]
        e = g
    return e


def shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray, r: float, theta: float) -> np.ndarray:
    """Pixels of ``SHAPES[shape]`` of circumradius ~r centred at dx = dy = 0, rotated by theta."""
    c, s = np.cos(theta), np.sin(theta)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    name = SHAPES[shape]
    if name == "disc":
        return u * u + v * v <= r * r
    if name == "square":
        return (np.abs(u) <= 0.75 * r) & (np.abs(v) <= 0.75 * r)
    if name == "triangle":
        m = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = 2 * np.pi * k / 3
            m &= np.cos(a) * u + np.sin(a) * v <= 0.5 * r
        return m
    if name == "star":
        return np.hypot(u, v) <= r * (0.6 + 0.4 * np.cos(5 * np.arctan2(v, u)))
    if name == "ellipse":
        return (u / r) ** 2 + (v / (0.5 * r)) ** 2 <= 1
    if name == "cross":
        a = 0.3 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= a)) | ((np.abs(v) <= r) & (np.abs(u) <= a))
    raise ValueError(f"unknown shape {shape}")


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.indices((h, w), dtype=np.float32)
    return xx + 0.5, yy + 0.5


def _stuff_layout(rng: np.random.Generator, xx, yy, s: float) -> np.ndarray:
    h = xx.shape[0]
    k = int(rng.integers(2, 4))
    kinds = rng.choice(len(STUFF_KINDS), size=k, replace=False)
    fields = np.empty((k, *xx.shape), dtype=np.float32)
    for j, kind in enumerate(kinds):
        f = np.full(xx.shape, rng.normal(0, 0.3), dtype=np.float32)
        for _ in range(3):
            freq = rng.uniform(0.4, 1.4) / s
            a, phase, amp = (
                rng.uniform(0, 2 * np.pi),
                rng.uniform(0, 2 * np.pi),
                rng.uniform(0.5, 1),
            )
            f += amp * np.cos(2 * np.pi * freq * (np.cos(a) * xx + np.sin(a) * yy) + phase)
        f += _VERTICAL_PRIOR[STUFF_KINDS[kind]] * (1 - 2 * yy / h)
        fields[j] = f
    return kinds[np.argmax(fields, axis=0)].astype(np.int8)


def _blob(rng: np.random.Generator, xx, yy, s: float) -> np.ndarray:
    h, w = xx.shape
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    r, phase = s * rng.uniform(0.12, 0.22), rng.uniform(0, 2 * np.pi)
    ang = np.arctan2(yy - cy, xx - cx)
    return np.hypot(xx - cx, yy - cy) <= r * (1 + 0.25 * np.sin(3 * ang + phase))


def _rgb(*c: float) -> np.ndarray:
    return np.array(c, dtype=np.float32)


def _stuff_texture(name: str, rng: np.random.Generator, xx, yy, s: float) -> np.ndarray:
    jitter = rng.uniform(-18, 18, 3).astype(np.float32)
    noise = rng.standard_normal(xx.shape).astype(np.float32)[..., None]
    if name == "sky":
        top, bottom = _rgb(105, 155, 228) + jitter, _rgb(200, 222, 246) + jitter
        t = np.clip(yy / s, 0, 1)[..., None]
        return top + (bottom - top) * t + 2 * noise
    if name == "grass":
        blades = np.sin(2 * np.pi * xx / (0.035 * s) + 3 * noise[..., 0])[..., None]
        return _rgb(70, 140, 55) + jitter + 22 * noise * _rgb(0.6, 1, 0.5) + 10 * blades
    if name == "water":
        wave = np.sin(2 * np.pi * (yy / (0.06 * s) + 0.6 * np.sin(2 * np.pi * xx / (0.25 * s))))
        return _rgb(40, 95, 170) + jitter + 25 * wave[..., None] + 4 * noise
    if name == "wall":
        bh, bw, line = 0.08 * s, 0.16 * s, 0.012 * s + 0.6
        offset = (np.floor(yy / bh) % 2) * bw / 2
        mortar = ((yy % bh) < line) | (((xx + offset) % bw) < line)
        brick = _rgb(160, 75, 55) + jitter
        return np.where(mortar[..., None], _rgb(205, 200, 190), brick) + 6 * noise
    if name == "road":
        return _rgb(95, 95, 100) + jitter + 14 * noise
    raise ValueError(name)


def _clutter_texture(rng: np.random.Generator, xx, yy, s: float) -> np.ndarray:
    cell = max(2.0, 0.06 * s)
    iy, ix = (yy // cell).astype(np.int64), (xx // cell).astype(np.int64)
    table = rng.uniform(0, 255, (int(iy.max()) + 1, int(ix.max()) + 1, 3))
    return table[iy, ix]


def pattern_mask(kind: int, u, v, radius) -> np.ndarray:
    """Where ``THING_KINDS[kind]`` shows its second colour, in pattern coordinates ``u``, ``v``
    (pixels, rotated) and ``radius`` (distance from the rings' centre), all divided by the
    period. Area fractions: plain 0, stripes / checker / rings / zigzag 1/2, dots pi/9."""
    name = THING_KINDS[kind]
    if name == "plain":
        return np.zeros(np.shape(u), dtype=bool)
    if name == "stripes":
        return np.floor(u) % 2 == 1
    if name == "checker":
        return (np.floor(u) + np.floor(v)) % 2 == 1
    if name == "dots":
        return np.hypot(u % 1 - 0.5, v % 1 - 0.5) < 1 / 3
    if name == "rings":
        return np.floor(radius) % 2 == 1
    if name == "zigzag":
        return np.floor(u + np.abs(v % 2 - 1)) % 2 == 1
    raise ValueError(f"unknown thing kind {kind}")


def _object_texture(rng: np.random.Generator, kind: int, xx, yy, s, cx, cy, r) -> np.ndarray:
    """The kind's pattern in two colours of random hue, at a random period and orientation,
    under a smooth shading ramp."""
    hue, sat, val = rng.uniform(), rng.uniform(0.45, 1), rng.uniform(0.5, 1)
    base = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255
    hue2 = (hue + rng.uniform(0.3, 0.7)) % 1
    second = np.array(colorsys.hsv_to_rgb(hue2, sat, val * 0.55), dtype=np.float32) * 255
    a = rng.uniform(0, 2 * np.pi)
    u = np.cos(a) * (xx - cx) + np.sin(a) * (yy - cy)
    v = -np.sin(a) * (xx - cx) + np.cos(a) * (yy - cy)
    period = s * rng.uniform(0.06, 0.09)
    alt = pattern_mask(kind, u / period, v / period, np.hypot(xx - cx, yy - cy) / period)
    shade = np.clip(1 - 0.2 * u / max(r, 1.0), 0.7, 1.3).astype(np.float32)[..., None]
    return np.where(alt[..., None], second, base) * shade


def _rotate_hue(rgb: np.ndarray, angle: float) -> np.ndarray:
    """Rotate the chroma of RGB pixels by ``angle`` in YIQ space (luminance unchanged)."""
    to_yiq = np.array(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
    )
    c, s_ = np.cos(angle), np.sin(angle)
    rot = np.array([[1, 0, 0], [0, c, -s_], [0, s_, c]], np.float32)
    m = np.linalg.inv(to_yiq) @ rot @ to_yiq
    return rgb @ m.T.astype(np.float32)


def _place(rng, xx, yy, s, r_range, c_range):
    """A silhouette of random shape, size, rotation and position (independent of the kind)."""
    h, w = xx.shape
    shape = int(rng.integers(len(SHAPES)))
    r = s * rng.uniform(*r_range)
    cx, cy = rng.uniform(*c_range) * w, rng.uniform(*c_range) * h
    theta = rng.uniform(0, 2 * np.pi)
    return shape_mask(shape, xx - cx, yy - cy, r, theta), (cx, cy, r)


def render_texture(rng: np.random.Generator, height: int, width: int, kind: int) -> np.ndarray:
    """A full-frame image of one surface pattern (``THING_KINDS[kind]``): the class-folder image.

    The pattern's two colours, period, orientation, centre (of the rings) and shading ramp are
    drawn as on an object, independently of the kind, so colour says nothing about the class.
    """
    xx, yy = _grid(height, width)
    s = float(min(height, width))
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    image = _object_texture(rng, kind, xx, yy, s, cx, cy, 0.4 * s)
    image += rng.normal(0, 2.5, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def render_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    n_objects: tuple[int, int] = (1, 4),
    dominant: int | None = None,
    force_difficult: bool = False,
    force_crowd: bool = False,
    force_other: bool = False,
) -> Scene:
    """One scene. ``n_objects`` bounds the number of *visible* objects (inclusive);
    ``dominant`` draws one large object of that kind and nothing else (class folders); the
    ``force_*`` switches guarantee edge cases (a difficult object, a crowd annotation, an
    unlabelled region) where a test or a demo needs one."""
    xx, yy = _grid(height, width)
    s = float(min(height, width))
    stuff = _stuff_layout(rng, xx, yy, s)
    if force_other or rng.random() < _P_OTHER:
        stuff[_blob(rng, xx, yy, s)] = OTHER
    image = np.zeros((height, width, 3), dtype=np.float32)
    for kind in np.unique(stuff):
        m = stuff == kind
        if kind == OTHER:
            tex = _clutter_texture(rng, xx, yy, s)
        else:
            tex = _stuff_texture(STUFF_KINDS[kind], rng, xx, yy, s)
            tex = _rotate_hue(tex, rng.uniform(0, 2 * np.pi))
        image[m] = tex[m]

    lo, hi = n_objects
    min_area = max(8, int(0.0015 * height * width))
    for _attempt in range(50):
        shapes = []
        if dominant is None:
            for _ in range(int(rng.integers(lo, hi + 1))):
                kind = int(rng.integers(len(THING_KINDS)))
                shapes.append((kind, *_place(rng, xx, yy, s, (0.14, 0.3), (0.08, 0.92))))
        else:
            shapes.append((dominant, *_place(rng, xx, yy, s, (0.22, 0.34), (0.38, 0.62))))
        instances = np.zeros((height, width), dtype=np.int16)
        for k, (_, m, _) in enumerate(shapes):
            instances[m] = k + 1
        areas = np.bincount(instances.ravel(), minlength=len(shapes) + 1)
        kept = [k for k in range(len(shapes)) if areas[k + 1] >= min_area]
        if lo <= len(kept) <= hi and (dominant is None or kept[-1:] == [len(shapes) - 1]):
            break
    else:  # pragma: no cover - 50 failed draws would need absurd n_objects bounds
        raise RuntimeError(f"could not place {n_objects} objects in a {width}x{height} scene")

    relabel = np.zeros(len(shapes) + 1, dtype=np.int16)
    relabel[[k + 1 for k in kept]] = np.arange(1, len(kept) + 1, dtype=np.int16)
    instances = relabel[instances]
    objects = []
    forced_difficult = int(rng.integers(len(kept))) if force_difficult and kept else -1
    forced_crowd = int(rng.integers(len(kept))) if force_crowd and kept else -1
    for j, k in enumerate(kept):
        kind, full_mask, (cx, cy, r) = shapes[k]
        m = instances == j + 1
        ys, xs = np.nonzero(m)
        box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        area = len(xs)
        # Texturing only the object's box keeps generation fast at large sizes.
        win = (slice(box[1], box[3] + 1), slice(box[0], box[2] + 1))
        tex = _object_texture(rng, kind, xx[win], yy[win], s, cx, cy, r)
        inside = m[win]
        image[win][inside] = tex[inside]
        truncated = box[0] == 0 or box[1] == 0 or box[2] == width - 1 or box[3] == height - 1
        small = area < 0.006 * height * width or area < 0.3 * int(full_mask.sum())
        objects.append(
            SceneObject(
                kind=kind,
                box=box,
                area=area,
                truncated=bool(truncated),
                difficult=bool(small or j == forced_difficult),
                crowd=bool(j == forced_crowd or rng.random() < _P_CROWD),
            )
        )
    image += rng.normal(0, 2.5, image.shape).astype(np.float32)
    return Scene(np.clip(image, 0, 255).round().astype(np.uint8), stuff, instances, objects)
