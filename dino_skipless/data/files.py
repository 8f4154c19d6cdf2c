"""Reading images, label PNGs and id lists, turning every failure into a DatasetError."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError, require_file, with_layout

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# PIL reports damaged files through several exception types; all of them mean "unreadable".
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError)


def load_rgb(path: Path) -> Image.Image:
    """Fully decoded RGB image (decoding now surfaces truncation here, not in a transform)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise DatasetError(f"image missing: {path}") from e
    except _DECODE_ERRORS as e:
        raise DatasetError(f"corrupt or truncated image {path}: {e}") from e


def load_label(path: Path, palette: np.ndarray | None = None) -> np.ndarray:
    """Raw label ids (HxW uint8) of a palette or grey PNG.

    Palette PNGs yield their indices, not colours. An RGB mask is mapped back through
    ``palette`` when one is given (VOC masks re-saved as RGB by image tools); colours not in it
    become 255.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.array(im)
    except FileNotFoundError as e:
        raise DatasetError(f"mask missing: {path}") from e
    except _DECODE_ERRORS as e:
        raise DatasetError(f"corrupt or truncated mask {path}: {e}") from e
    if mode in ("P", "L"):
        return arr
    if mode in ("I", "I;16", "I;16B", "I;16L") and arr.size and 0 <= arr.min() and arr.max() < 256:
        return arr.astype(np.uint8)
    if mode in ("RGB", "RGBA") and palette is not None:
        return rgb_to_index(arr[..., :3], palette)
    raise DatasetError(
        f"mask {path} has PIL mode {mode!r} and shape {arr.shape}; expected a single-channel "
        "(palette or grey) PNG of class ids"
    )


def rgb_to_index(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pal_code = (palette[:, 0].astype(np.int64) << 16) | (palette[:, 1].astype(np.int64) << 8)
    pal_code = pal_code | palette[:, 2]
    # Later palette entries must not shadow earlier ones (255 and 0 never collide in VOC's map).
    keys, first = np.unique(pal_code, return_index=True)
    pos = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    found = keys[pos] == code
    return np.where(found, first[pos], 255).astype(np.uint8)


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
