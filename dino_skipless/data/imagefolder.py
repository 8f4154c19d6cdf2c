"""Any folder of images (ImageNet train, a photo dump, synthetic scenes) for pretraining/k-NN.

Images are found recursively. The class of an image is its top-level folder under the root
(torchvision ImageFolder's rule, so ImageNet's ``train/`` gives the 1,000 synsets); images lying
directly in the root form a class named ``"."``. Classes are sorted by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import layouts
from .base import _ReaderBase
from .errors import DatasetError, require_dir, with_layout
from .files import IMAGE_EXTENSIONS, load_rgb

ROOT_CLASS = "."


def scan_images(root: Path) -> list[tuple[Path, str]]:
    """(path, class name) of every image under root, sorted by path for a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        cls = ROOT_CLASS if rel == "." else rel.split(os.sep)[0]
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                found.append((Path(dirpath) / f, cls))
    found.sort(key=lambda t: str(t[0]))
    return found


class ImageFolderDataset(_ReaderBase):
    """``ds[i] -> (transform(image) or image, class index)``.

    Attributes as torchvision's ImageFolder: ``classes``, ``class_to_idx``, ``samples``,
    ``targets``. ``on_error`` follows the readers' policy (see ``base``).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        *,
        on_error: str = "raise",
    ):
        self._init_errors(on_error)
        self.root = Path(root)
        self.name = "imagefolder"
        require_dir(self.root, "image folder", layouts.IMAGEFOLDER)
        found = scan_images(self.root)
        if not found:
            raise DatasetError(
                with_layout(f"no images found under {self.root}", layouts.IMAGEFOLDER)
            )
        self.classes = sorted({c for _, c in found})
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(p, self.class_to_idx[c]) for p, c in found]
        self.targets = [t for _, t in self.samples]
        self.ids = [str(p.relative_to(self.root)) for p, _ in self.samples]
        self.transform = transform

    def restrict(self, indices) -> None:
        """Keep only the images at ``indices`` (in that order); the classes stay as scanned."""
        self.samples = [self.samples[i] for i in indices]
        self.targets = [t for _, t in self.samples]
        self.ids = [str(p.relative_to(self.root)) for p, _ in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image_path(self, i: int) -> Path:
        return self.samples[i][0]

    def _get(self, i: int) -> Any:
        path, label = self.samples[i]
        img = load_rgb(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    def check_sample(self, i: int) -> list[str]:
        try:
            load_rgb(self.samples[i][0])
        except DatasetError as e:
            return [str(e)]
        return []

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(images={len(self)}, classes={len(self.classes)}, "
            f"root={str(self.root)!r})"
        )
