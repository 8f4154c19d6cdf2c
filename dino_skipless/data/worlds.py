"""Small-scale image worlds for pretraining and k-NN, as ImageFolders, generated once and cached.

A *world* is the set of class folders that a small-scale DINO run pretrains on, together with
the held-out images its k-NN evaluation (and the trainer's online k-NN monitor) scores. Three:

* ``patterns``: the project's synthetic surface patterns (``generate.py``, format
  ``imagefolder``): pretraining images of seed ``s``, k-NN images of seed ``s + 1``. Designed
  here, so a result on it alone can reflect the design.
* ``photos``: **real photographs and textures that scikit-image ships** (``skimage.data``: an
  astronaut, a cat, coffee, coins, a rocket, brick, grass and gravel textures, microscopy, the
  Hubble deep field, ...), 15 classes, class = source photograph. Nobody here chose what is in
  them. Each photograph is cut along its long axis into a training region (the first 2/3) and a
  validation region (the last 1/3); ``train/`` holds ``n`` square crops of training regions,
  ``val/`` ``n`` crops of validation regions, each crop's side uniform in [1/5, 1/3] of the
  photograph's short side (so it always fits the validation region), resized to ``size`` px. A
  crop is recognised only by what its photograph looks like elsewhere: a proxy for instance
  recognition on real image statistics (noise, JPEG, lighting, natural textures).
* ``digits``: scikit-learn's 1,797 hand-written digits (8 x 8 grey levels 0-16), upscaled to
  ``size`` px, white strokes on black, 10 classes, no train/val split (k-NN splits per class).
  A *low-information* world: at the start of DINO the random teacher's target carries a few
  tenths of a nat about such an image (about 1 nat on the other two worlds), and with the
  published centring a CPU run collapses (README, "A remedy for low-information images").

``world_root(world, n, size, seed)`` returns the root (``train/`` + ``val/`` for photos, class
folders otherwise); ``pretrain_root`` / ``knn_root_of`` say which folder each use reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

WORLDS = ("patterns", "photos", "digits")
WORLD_VERSION = 1
MANIFEST = "world.json"

# skimage.data's bundled files that are photographs or natural textures (the synthetic test
# cards -- chessboards, colour wheel, logo, phantom, horse silhouette -- and the near-duplicate
# right motorcycle view are left out). Gray ones become 3 equal channels.
PHOTOS = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "cell": "cell.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "ihc": "ihc.png",
    "moon": "moon.png",
    "motorcycle": "motorcycle_left.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}
TRAIN_SHARE = 2 / 3  # of the long axis: the training region; the rest is validation
CROP_SIDE = (1 / 5, 1 / 3)  # of the short side


class WorldError(ValueError):
    """A world that cannot be built here (e.g. its dependency is missing)."""


def _skimage_dir() -> Path:
    try:
        import skimage.data
    except ImportError:
        raise WorldError(
            "the photos world needs scikit-image (pip install scikit-image): it is built from "
            "the photographs skimage.data ships"
        ) from None
    return Path(skimage.data.__file__).parent


def load_photo(name: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of one of ``PHOTOS``."""
    path = _skimage_dir() / PHOTOS[name]
    if not path.is_file():
        raise WorldError(f"{path} is missing from this scikit-image install")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def photo_crop_box(
    rng: np.random.Generator, h: int, w: int, split: str
) -> tuple[int, int, int, int]:
    """``(top, left, side, side)`` of one square crop in the ``split`` region of an h x w photo.

    The regions split the long axis at ``TRAIN_SHARE``: they are disjoint, so no validation
    pixel was ever seen in training."""
    short, long_ = min(h, w), max(h, w)
    cut = int(round(TRAIN_SHARE * long_))
    lo, hi = (0, cut) if split == "train" else (cut, long_)
    side = int(round(rng.uniform(*CROP_SIDE) * short))
    side = max(1, min(side, hi - lo))
    a = int(rng.integers(lo, hi - side + 1))  # along the long axis
    b = int(rng.integers(0, short - side + 1))
    return (b, a, side, side) if w >= h else (a, b, side, side)


def _write_photos(out: Path, n: int, size: int, seed: int) -> dict:
    names = sorted(PHOTOS)
    photos = {name: load_photo(name) for name in names}
    counts = {}
    for split, stream in (("train", 0), ("val", 1)):
        for name in names:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = names[i % len(names)]
            img = photos[name]
            rng = np.random.default_rng([seed, stream, i])
            top, left, hh, ww = photo_crop_box(rng, *img.shape[:2], split)
            crop = Image.fromarray(img[top : top + hh, left : left + ww])
            crop = crop.resize((size, size), Image.Resampling.BICUBIC)
            crop.save(out / split / name / f"{name}_{i:06d}.jpg", quality=95)
        counts[split] = n
    return {**counts, "classes": len(names)}


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """One 8 x 8 digit (grey levels 0-16) as a ``size`` px grey image, bilinearly upscaled."""
    small = Image.fromarray(np.round(np.asarray(pixels, float) * (255 / 16)).astype(np.uint8))
    return small.resize((size, size), Image.Resampling.BILINEAR)


def _write_digits(out: Path, n: int, size: int, seed: int) -> dict:
    from sklearn.datasets import load_digits  # shipped with scikit-learn: no download

    d = load_digits()
    order = np.arange(len(d.target))
    if n < len(order):  # a seeded subset (the default is all 1,797)
        order = np.sort(np.random.default_rng(seed).permutation(len(order))[:n])
    for c in range(10):
        (out / str(c)).mkdir(parents=True, exist_ok=True)
    for i in order:
        digit_image(d.images[i], size).save(out / str(d.target[i]) / f"digit_{i:04d}.png")
    return {"images": int(len(order)), "classes": 10}


DIGITS_N = 1797  # all of scikit-learn's digits


def _manifest(world: str, n: int, size: int, seed: int) -> dict:
    return {"world": world, "n": n, "size": size, "seed": seed, "version": WORLD_VERSION}


def manifest_matches(root: Path, world: str, n: int, size: int, seed: int) -> bool:
    try:
        m = json.loads((Path(root) / MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return all(m.get(k) == v for k, v in _manifest(world, n, size, seed).items())


def generate_world(out: str | Path, world: str, n: int, size: int, seed: int) -> dict:
    """Write ``world`` under ``out`` (photos or digits) with its manifest, written last."""
    if world not in ("photos", "digits"):
        raise WorldError(f"generate_world makes photos or digits, got {world!r}")
    if n < 1 or size < 16:
        raise WorldError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = (_write_photos if world == "photos" else _write_digits)(out, n, size, seed)
    (out / MANIFEST).write_text(
        json.dumps({**_manifest(world, n, size, seed), "counts": counts}, indent=1) + "\n", "utf-8"
    )
    return counts


def world_root(
    world: str, n: int, size: int, seed: int = 0, cache_dir: str | Path | None = None
) -> Path:
    """The cached root of a world (generated on first use; see the module docstring)."""
    from .cache import cached_generation, synthetic_root

    if world not in WORLDS:
        raise WorldError(f"world must be one of {', '.join(WORLDS)}, got {world!r}")
    if world == "patterns":
        return synthetic_root("imagefolder", n=n, size=size, seed=seed, cache_dir=cache_dir)
    if world == "digits":
        n = min(n, DIGITS_N)
    return cached_generation(
        f"{world}_n{n}_s{size}_seed{seed}",
        lambda root: manifest_matches(root, world, n, size, seed),
        lambda root: generate_world(root, world, n, size, seed),
        cache_dir,
    )


def pretrain_root(world: str, n: int, size: int, seed: int = 0, cache_dir=None) -> Path:
    """The folder a pretraining run on ``world`` reads (photos: its training crops only)."""
    root = world_root(world, n, size, seed, cache_dir)
    return root / "train" if world == "photos" else root


def knn_root_of(world: str, n: int, size: int, seed: int = 0, cache_dir=None) -> Path:
    """The ImageFolder that k-NN scores on ``world``: photos, its ``train/`` (the bank) and
    ``val/`` (the queries, from disjoint regions); digits, its class folders (split per class);
    patterns, another seed's images (``seed + 1``), none of which was pretrained on."""
    if world == "patterns":
        return world_root(world, n, size, seed + 1, cache_dir)
    return world_root(world, n, size, seed, cache_dir)
