"""``data.on_error``: what pretraining does with an image that cannot be decoded.

The guard sits where a sample's base image is loaded, before any augmentation. It never raises
inside a DataLoader worker (a worker's exception reaches the user as a traceback of the worker);
it returns the image with a status and the problem, so that the main process sees every bad
sample, counts it and, when it must stop, stops with one line naming the file.

- ``raise``: a bad image gives a blank placeholder with status ``UNUSABLE``; the trainer stops
  on it before training on the batch.
- ``skip``: a bad image is replaced by another image of the dataset drawn from
  ``(seed, epoch, index, attempt)`` (status ``REPLACED``), so a resumed or re-run epoch replaces
  it by the same image, and the replacement is augmented with the bad sample's own seeds. The
  trainer counts replacements and stops when more than ``data.max_bad_fraction`` of an epoch's
  samples were bad.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..data import DatasetError

ON_ERROR = ("raise", "skip")
OK, REPLACED, UNUSABLE = 0, 1, 2
MAX_TRIES = 32  # replacement draws before giving up (all fail only if most files are bad)
_PLACEHOLDER = 8  # px; any size works, the crops resize it


def check_command(root: str | Path | None) -> str:
    """The command that lists every unreadable file of an image folder."""
    return f"python -m dino_skipless.data.check --dataset imagefolder --root {root or 'ROOT'}"


def replacement_index(seed: int, epoch: int, index: int, attempt: int, n: int) -> int:
    """Index of the ``attempt``-th candidate replacing sample ``index`` of ``epoch``.

    Seeded by four words, so it is independent of ``trainer.sample_seeds`` (three words)."""
    (word,) = np.random.SeedSequence([seed, epoch, index, attempt]).generate_state(1)
    return int(word) % n


def load_image(base, seed: int, epoch: int, index: int, on_error: str):
    """``(image, status, problem)`` for sample ``index`` of ``epoch``; ``problem`` is "" if OK.

    ``base[i][0]`` must load image ``i`` or raise ``DatasetError`` naming its file."""
    try:
        return base[index][0], OK, ""
    except DatasetError as e:
        problem = str(e)
    if on_error == "skip":
        n = len(base)
        for attempt in range(MAX_TRIES):
            j = replacement_index(seed, epoch, index, attempt, n)
            if j == index:
                continue
            try:
                img = base[j][0]
            except DatasetError:
                continue
            name = base.image_path(j) if hasattr(base, "image_path") else f"image {j}"
            return img, REPLACED, f"{problem} (replaced by {name})"
        problem += f"; none of {MAX_TRIES} images drawn to replace it could be read either"
    return Image.new("RGB", (_PLACEHOLDER, _PLACEHOLDER)), UNUSABLE, problem


def unusable_message(problem: str, on_error: str, root) -> str:
    """One line for a bad image the run cannot go on with."""
    fix = (
        "set data.on_error=skip to replace such images"
        if on_error == "raise"
        else "most of the data is unreadable"
    )
    return f"{problem}; {fix}; `{check_command(root)}` lists every unreadable file"


def too_many_message(bad: int, samples: int, epoch: int, max_fraction: float, root) -> str:
    return (
        f"data.on_error=skip: {bad} of the {samples} samples of epoch {epoch} were unreadable, "
        f"more than data.max_bad_fraction={max_fraction:g}; `{check_command(root)}` lists the "
        "bad files: fix or remove them and --resume (or raise data.max_bad_fraction)"
    )
