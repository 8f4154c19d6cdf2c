"""Any folder of images (ImageNet train, a photo dump, synthetic scenes) for pretraining/k-NN.

Images are found recursively. The class of an image is its top-level folder under the root
(torchvision ImageFolder's rule, so ImageNet's ``train/`` gives the 1,000 synsets); images lying
directly in the root form a class named ``"."``. Classes are sorted by name. Links are followed,
but each folder is walked and each file counted once (``scan_image_folder``): a link loop used
to multiply the images, and copies of one class's files landed in another.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import layouts
from .base import _ReaderBase
from .errors import DatasetError, require_dir, with_layout
from .files import IMAGE_EXTENSIONS, load_rgb

ROOT_CLASS = "."


@dataclass
class Scan:
    """What :func:`scan_image_folder` found: ``found`` (path, class) sorted by path, the folder
    links not followed because their folder was already walked (link, its target), and the
    files reached a second time through a link (the path not used, the path used)."""

    found: list[tuple[Path, str]] = field(default_factory=list)
    skipped_links: list[tuple[Path, Path]] = field(default_factory=list)
    duplicate_files: list[tuple[Path, Path]] = field(default_factory=list)


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def scan_image_folder(root: Path) -> Scan:
    """Every image under ``root`` once, with its class (the top-level folder).

    Links are followed (a dataset made of links into a shared store is common), but never into
    a folder already walked: the real folders under ``root`` are walked first, then the linked
    ones in the order found, so a loop (``a/up -> ..``) or a second link to a folder adds
    nothing, and a link to a folder of the root does not relabel its images. A file reached a
    second time (a link to a file) counts once, under the first path that is not a link.
    """
    root = Path(root)
    scan = Scan()
    try:
        visited = {_key(os.stat(root))}
    except OSError:
        return scan
    links: list[tuple[Path, str | None]] = []  # (linked folder, its class) still to walk
    files: list[tuple[Path, str, bool]] = []  # (path, class, is a link) in walking order

    def walk(top: Path, cls: str | None) -> None:
        stack = [(top, cls)]
        while stack:
            folder, c = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue  # unreadable folder: as os.walk, skipped
            subdirs = []
            for e in entries:
                if e.name.startswith("."):
                    continue
                sub_cls = c if c is not None else e.name
                try:
                    is_dir = e.is_dir()  # follows a link
                except OSError:
                    is_dir = False
                if is_dir:
                    if e.is_symlink():
                        links.append((Path(e.path), sub_cls))
                        continue
                    key = _key(e.stat())
                    if key in visited:  # a real folder of a linked tree seen before
                        continue
                    visited.add(key)
                    subdirs.append((Path(e.path), sub_cls))
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append((Path(e.path), ROOT_CLASS if c is None else c, e.is_symlink()))
            stack.extend(reversed(subdirs))

    walk(root, None)
    while links:  # breadth-first: every real folder before the links into it
        link, cls = links.pop(0)
        try:
            key = _key(os.stat(link))
        except OSError:
            continue  # a broken link
        if key in visited:
            scan.skipped_links.append((link, Path(os.path.realpath(link))))
            continue
        visited.add(key)
        walk(link, cls)

    if any(is_link for _, _, is_link in files):
        files = _drop_second_paths(files, scan)
    scan.found = sorted(((p, c) for p, c, _ in files), key=lambda t: str(t[0]))
    return scan


def _drop_second_paths(files, scan: Scan):
    """Keep one path per file (a regular entry over a link; else the first), as found."""
    keys = []
    for p, _, _ in files:
        try:
            keys.append(_key(os.stat(p)))
        except OSError:  # a broken link: kept, so that reading it names it
            keys.append(("missing", str(p)))
    chosen: dict = {}
    for i, (k, (_, _, is_link)) in enumerate(zip(keys, files)):
        j = chosen.get(k)
        if j is None or (files[j][2] and not is_link):
            chosen[k] = i
    keep = set(chosen.values())
    for i, k in enumerate(keys):
        if i not in keep:
            scan.duplicate_files.append((files[i][0], files[chosen[k]][0]))
    return [f for i, f in enumerate(files) if i in keep]


def scan_images(root: Path) -> list[tuple[Path, str]]:
    """(path, class name) of every image under root, once each, sorted by path."""
    return scan_image_folder(root).found


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
        scan = scan_image_folder(self.root)
        found = scan.found
        # reported by data.check: a loop or a second link walked nothing twice
        self.skipped_links = scan.skipped_links
        self.duplicate_files = scan.duplicate_files
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
