"""Fingerprints of files and of the data a run saw.

A cache is reused and two runs are paired only when their fingerprints agree: a path, a size or
a modification time says nothing about what a file holds now (a checkpoint overwritten with
``cp``, masks replaced in place), so these hash content. ``file_digest`` is the sha256 of a
file's bytes; ``digest_of`` hashes a sequence of such fingerprints (order included).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def digest_of(items: Iterable[str | bytes]) -> str:
    """sha256 (hex) of a sequence of strings or bytes; each item is length-prefixed, so
    ``["ab", "c"]`` and ``["a", "bc"]`` differ."""
    h = hashlib.sha256()
    for item in items:
        b = item.encode() if isinstance(item, str) else bytes(item)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def files_digest(paths: Iterable[str | os.PathLike]) -> str:
    """Digest of the contents of ``paths`` in order (not of their names: a copy of the data
    elsewhere has the same digest)."""
    return digest_of(file_digest(p) for p in paths)


def segmentation_digest(ds) -> dict[str, str]:
    """``{"images", "masks"}``: content digests of a segmentation split's files, in order."""
    n = len(ds)
    return {
        "images": files_digest(ds.image_path(i) for i in range(n)),
        "masks": files_digest(ds.mask_path(i) for i in range(n)),
    }


class DataMismatch(ValueError):
    """Two runs to be paired were not made on the same images or ground truth."""


def require_same_data(
    a: dict | None, b: dict | None, hint: str = "", names: tuple[str, str] = ("A", "B")
) -> str | None:
    """Refuse to pair two runs whose data digests differ (``DataMismatch`` naming what
    differs, then ``hint``: how to make them agree). Returns None when they agree, or a warning
    when a run records none (made before runs kept one): the caller's older checks are all
    that can be done then, and the reader must be told."""
    if not a or not b:
        missing = " and ".join(n for n, d in zip(names, (a, b)) if not d)
        return (
            f"run {missing} records no data digest (written before runs kept one): whether "
            "both runs saw the same image files could not be checked; rerun it to be sure"
        )
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if differ:
        raise DataMismatch(
            "the two runs were not made on the same data (their "
            + " and ".join(differ)
            + " differ)"
            + (f": {hint}" if hint else "")
        )
    return None
