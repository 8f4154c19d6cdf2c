"""Deterministic data order and per-sample deterministic multi-crop augmentation.

Data order and augmentations are a pure function of ``(seed, epoch, index)``: the sampler is
DistributedSampler's permutation (seeded by ``seed + epoch``) and each sample's crops are drawn
from RNGs seeded by ``(seed, epoch, index)``. So a mid-epoch resume replays exactly, any number
of loader workers gives the same batches, and N processes with batch B/N see the same crops as
one process with batch B (the official code instead draws augmentations from per-worker RNGs).
"""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .augment import MultiCropAugmentation
from .decode import load_image


def sample_seeds(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (torch, python) for sample ``index`` in ``epoch``."""
    a, b = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
    return int(a), int(b)


@contextlib.contextmanager
def seeded_rngs(*key: int):
    """Run a block with torch's, Python's and numpy's global RNGs seeded from ``key`` (e.g.
    ``(seed, epoch, index)``), and put the caller's states back afterwards.

    For third-party transforms that draw from the global RNGs (timm's RandAugment draws its ops
    with ``np.random``, its crops and magnitudes with ``random``, random erasing with torch).
    The torch and Python seeds are ``sample_seeds``' for the same key (SeedSequence words are a
    prefix of each other), so a transform that uses only those two draws as under
    ``SeededMultiCrop``."""
    t, p, n = (int(v) for v in np.random.SeedSequence(list(key)).generate_state(3))
    torch_state, py_state, np_state = (
        torch.get_rng_state(),
        random.getstate(),
        np.random.get_state(),
    )
    try:
        torch.default_generator.manual_seed(t)
        random.seed(p)
        np.random.seed(n)
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


class SeededTransform(Dataset):
    """``ds[(epoch, index)] -> transform(*base[index])`` under ``seeded_rngs(seed, epoch, index)``.

    The data layer of the supervised runs (``classifier``, and the ceilings of
    ``dino_skipless.supervised``): a labelled sample's augmentation is a pure function of
    ``(seed, epoch, index)``, whatever the worker, the process or a resume."""

    def __init__(self, base: Dataset, transform, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        sample = self.base[index]
        with seeded_rngs(self.seed, epoch, index):
            return self.transform(*sample)


class SeededMultiCrop(Dataset):
    """``ds[(epoch, index)] -> [g1, g2, l1..ln]``: crops depend only on (seed, epoch, index).

    The multi-crop transform draws from torch's and Python's global RNGs (as upstream); they are
    seeded per sample and restored afterwards, so the caller's RNG streams are untouched.
    With ``on_error`` (``data.on_error``) a sample is ``(crops, status, problem)`` of
    ``decode.load_image`` instead, so unreadable images reach the main process as data.
    """

    def __init__(
        self,
        base: Dataset,
        transform: MultiCropAugmentation,
        seed: int,
        on_error: str | None = None,
    ):
        self.base = base
        self.transform = transform
        self.seed = seed
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> list[torch.Tensor]:
        epoch, index = key
        if self.on_error is None:
            img = self.base[index][0]
        else:
            img, status, problem = load_image(self.base, self.seed, epoch, index, self.on_error)
        torch_seed, py_seed = sample_seeds(self.seed, epoch, index)
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        try:
            torch.default_generator.manual_seed(torch_seed)
            random.seed(py_seed)
            crops = self.transform(img)
            return crops if self.on_error is None else (crops, status, problem)
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)


class EpochSampler(Sampler):
    """``torch.utils.data.DistributedSampler`` (shuffle, pad to a multiple of the world size,
    rank-strided shard; permutation seeded by ``seed + epoch``) yielding ``(epoch, index)``,
    with ``skip`` samples dropped from the front for a mid-epoch resume."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.n, self.num_replicas, self.rank, self.seed = n, num_replicas, rank, seed
        self.num_samples = math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        idx = torch.randperm(self.n, generator=g).tolist()
        pad = self.total_size - len(idx)
        if pad > 0:
            idx += (idx * math.ceil(pad / len(idx)))[:pad]
        return idx[self.rank : self.total_size : self.num_replicas]

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.indices()[self.skip :]])

    def __len__(self) -> int:
        return self.num_samples - self.skip
