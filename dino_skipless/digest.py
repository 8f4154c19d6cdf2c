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
