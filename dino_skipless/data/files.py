"""Reading images, label PNGs and id lists, turning every failure into a DatasetError.

Every image the pipeline decodes goes through :func:`read_image`: a missing, undecodable or
oversized file (a decompression bomb, see ``DEFAULT_MAX_IMAGE_PIXELS``) is a DatasetError naming
it, and :func:`to_rgb` converts 16-bit and float images by their real range or refuses them
naming their mode.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError, require_file, with_layout

T = TypeVar("T")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# PIL reports damaged files through several exception types; all of them mean "unreadable".
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError)

# Decompression bombs: a small file that decodes to a huge image and exhausts memory. PIL warns
# above Image.MAX_IMAGE_PIXELS (89,478,485 px, a 256 MB RGB image) and raises above twice that,
# an exception no stage caught. Here an image above the limit, read off its header before any
# decoding, is a bad image like a corrupt one (data.on_error=skip replaces it in pretraining).
# The default is PIL's warning threshold; the largest images of the paper's datasets are far
# below it (ImageNet: ~12 M px). The limit travels in the environment, so loader workers see it.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
MAX_PIXELS_ENV = "SKIPLESS_MAX_IMAGE_PIXELS"
RAISE_LIMIT_HINT = (
    "data.max_image_pixels=N (pretraining, supervised), --max-image-pixels N (evaluations, "
    f"data.check) or {MAX_PIXELS_ENV}=N"
)

_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def max_image_pixels() -> int:
    """The decompression-bomb limit in pixels (``SKIPLESS_MAX_IMAGE_PIXELS``, else the default)."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if not value:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise DatasetError(f"{MAX_PIXELS_ENV}={value!r}: expected a positive number of pixels")
    return n


def set_max_image_pixels(n: int | None) -> None:
    """Set the limit for this process and the loader workers it starts (None: the default)."""
    if n is None:
        os.environ.pop(MAX_PIXELS_ENV, None)
        return
    if int(n) < 1:
        raise ValueError(f"the image pixel limit must be a positive number, got {n}")
    os.environ[MAX_PIXELS_ENV] = str(int(n))


def _bomb_message(path, size: tuple[int, int] | None, limit: int) -> str:
    what = f"is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else "is too large"
    return (
        f"image {path} {what}, above the decompression-bomb limit of {limit:,}: treated as a "
        f"bad image; if it is genuine, raise the limit: {RAISE_LIMIT_HINT}"
    )


def read_image(path: Path, use: Callable[[Image.Image], T], what: str = "image") -> T:
    """``use(opened image)`` with every failure a DatasetError naming ``path``: missing,
    undecodable, above the pixel limit (checked on the header, before decoding), or of a mode
    ``to_rgb`` refuses."""
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check: a warning above its limit, an error above twice it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
                # only ever raised: a lower limit is checked below, and PIL's global, lowered,
                # would outlive this call for every other Image.open of the process
                Image.MAX_IMAGE_PIXELS = limit
            im = Image.open(path)
        with im:
            if im.width * im.height > limit:
                raise DatasetError(_bomb_message(path, im.size, limit))
            return use(im)
    except DatasetError:
        raise
    except FileNotFoundError as e:
        raise DatasetError(f"{what} missing: {path}") from e
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise DatasetError(
            _bomb_message(path, None, limit) + (f" ({found.group(1)} px)" if found else "")
        ) from e
    except _DECODE_ERRORS as e:
        raise DatasetError(f"corrupt or truncated {what} {path}: {e}") from e


def to_rgb(im: Image.Image, path) -> Image.Image:
    """8-bit RGB by the image's real range: 16-bit grey (``I;16*``, or ``I`` from a PNG, which
    stores at most 16 bits) scaled by 255/65535; float (``F``) in [0, 1] scaled by 255; other
    modes by PIL. PIL's own ``convert("RGB")`` clips 16-bit values to 255 (a 16-bit photo turns
    white) and truncates floats (a [0, 1] image turns black). Refused, naming the mode: floats
    outside [0, 1] or not finite, 32-bit integers (their range cannot be known)."""
    mode = im.mode
    if mode in _16BIT_MODES or (mode == "I" and im.format == "PNG"):
        a = np.asarray(im).astype(np.float64)
        grey = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        finite = bool(np.isfinite(a).all())
        lo, hi = (float(a.min()), float(a.max())) if finite else (float("nan"), float("nan"))
        if finite and lo >= 0.0 and hi <= 1.0:
            return Image.fromarray(np.round(a * 255.0).astype(np.uint8), "L").convert("RGB")
        values = f"values in [{lo:g}, {hi:g}]" if finite else "non-finite values"
        raise DatasetError(
            f"image {path} has PIL mode 'F' (32-bit float) with {values}: only floats in [0, 1] "
            "are read (as 0-255); convert it to an 8-bit image"
        )
    if mode == "I":
        a = np.asarray(im)
        raise DatasetError(
            f"image {path} has PIL mode 'I' (32-bit integers, values in [{a.min()}, {a.max()}]): "
            "its range cannot be known; convert it to an 8- or 16-bit image"
        )
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise DatasetError(
            f"image {path} has PIL mode {mode!r}, not convertible to RGB: {e}"
        ) from e


def mode_note(path: Path) -> str | None:
    """A warning for an image that ``to_rgb`` converts by range (16-bit, float), None for
    others; reads the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                mode, fmt = im.mode, im.format
    except Exception:  # the reader reports unreadable files
        return None
    if mode in _16BIT_MODES or (mode == "I" and fmt == "PNG"):
        return f"{path}: 16-bit image (PIL mode {mode}), read as 8 bits by its 0-65535 range"
    if mode == "F":
        return f"{path}: 32-bit float image, read as 8 bits by the range [0, 1]"
    return None


def load_rgb(path: Path) -> Image.Image:
    """Fully decoded RGB image (decoding now surfaces truncation here, not in a transform)."""

    def use(im):
        im.load()
        return to_rgb(im, path)

    return read_image(path, use)


def load_label(path: Path, palette: np.ndarray | None = None) -> np.ndarray:
    """Raw label ids (HxW uint8) of a palette or grey PNG.

    Palette PNGs yield their indices, not colours. An RGB mask is mapped back through
    ``palette`` when one is given (VOC masks re-saved as RGB by image tools); colours not in it
    become 255 (``load_label_counted`` counts them).
    """
    return load_label_counted(path, palette)[0]


def load_label_counted(path: Path, palette: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``(raw label ids, pixels of an RGB mask whose colour is not in the palette)``."""

    def use(im):
        im.load()
        return im.mode, np.array(im)

    mode, arr = read_image(path, use, "mask")
    if mode in ("P", "L"):
        return arr, 0
    if mode in ("I", "I;16", "I;16B", "I;16L") and arr.size and 0 <= arr.min() and arr.max() < 256:
        return arr.astype(np.uint8), 0
    if mode in ("RGB", "RGBA") and palette is not None:
        index, found = rgb_lookup(arr[..., :3], palette)
        return index, int((~found).sum())
    raise DatasetError(
        f"mask {path} has PIL mode {mode!r} and shape {arr.shape}; expected a single-channel "
        "(palette or grey) PNG of class ids"
    )


def rgb_to_index(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Palette index of every pixel's colour; 255 for colours not in the palette."""
    return rgb_lookup(rgb, palette)[0]


def rgb_lookup(rgb: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(palette index or 255, whether the colour is in the palette)`` per pixel."""
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pal_code = (palette[:, 0].astype(np.int64) << 16) | (palette[:, 1].astype(np.int64) << 8)
    pal_code = pal_code | palette[:, 2]
    # Later palette entries must not shadow earlier ones (255 and 0 never collide in VOC's map).
    keys, first = np.unique(pal_code, return_index=True)
    pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    found = keys[pos] == code
    return np.where(found, first[pos], 255).astype(np.uint8), found


def read_id_list(path: Path, what: str, layout: str | None = None) -> list[str]:
    """First token of every non-empty line (VOC per-class lists carry a second column)."""
    require_file(path, what, layout)
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if parts:
                ids.append(parts[0])
    if not ids:
        raise DatasetError(with_layout(f"{what} is empty: {path}", layout))
    return ids


def listdir_set(directory: Path) -> set[str]:
    """Names in a directory, listed once so membership tests cost no system call per file."""
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


def stems_with_ext(directory: Path, exts: tuple[str, ...]) -> list[str]:
    return sorted(
        os.path.splitext(n)[0] for n in listdir_set(directory) if n.lower().endswith(exts)
    )
