"""The supervised data pipeline: timm's transforms, Mixup/CutMix and losses, seeded per sample.

Everything the recipe augments with is timm's, built as the weight-selection code builds it
(``datasets.build_transform``, ``main.py``): ``create_transform`` (random resized crop, flip,
RandAugment, random erasing; eval: resize + centre crop), ``Mixup`` (with the label smoothing in
its targets) and ``SoftTargetCrossEntropy``. What is ours is only the seeding: each sample's
augmentation runs under ``seeded_rngs(seed, epoch, index)`` (``dino.sampling.SeededTransform``)
and each step's Mixup/CutMix draw under ``seeded_rngs(seed, step, micro-batch, rank)``, so a
run is a pure function of its seed: resume is exact and the worker count does not matter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.auto_augment import posterize as timm_posterize
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import DatasetError, ImageFolderDataset, synthetic_root
from ..dino.sampling import EpochSampler, SeededTransform, seeded_rngs
from ..fileio import portable_path
from .config import ClassifyConfig

SPLITS = ("train", "val")
LAYOUT = """\
ROOT/train/<class>/<image>.JPEG   (ImageNet layout: the same class folders in both splits)
ROOT/val/<class>/<image>.JPEG
"""


def _posterize(img: Image.Image, bits_to_keep: int, **kw) -> Image.Image:
    """timm's RandAugment posterize as under the Pillow the recipe ran with: keeping 0 bits gives
    a black image. ``inc1`` maps magnitudes at the top of the range (m9 + N(0, 0.5) clipped to
    10) to 0 bits, which recent Pillow refuses (``ValueError: bits must be between or equal to 1
    and 8``; Pillow 13 here): unpatched, about one training image in a few hundred stops the
    run."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # old Pillow: every value masked to 0
    return timm_posterize(img, bits_to_keep, **kw)


def _patch_posterize(transform) -> None:
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):  # timm's RandAugment: AugmentOp instances
            if getattr(op, "aug_fn", None) is timm_posterize:
                op.aug_fn = _posterize


def train_transform(cfg: ClassifyConfig):
    """``timm.data.create_transform(is_training=True, ...)`` with the recipe's arguments (and
    RandAugment's posterize made safe for current Pillow: ``_posterize``)."""
    a = cfg.aug
    transform = create_transform(
        input_size=cfg.model.img_size,
        is_training=True,
        scale=tuple(a.scale),
        ratio=tuple(a.ratio),
        hflip=a.hflip,
        color_jitter=a.color_jitter,
        auto_augment=a.auto_augment or None,
        interpolation=a.interpolation,
        re_prob=a.re_prob,
        re_mode=a.re_mode,
        re_count=a.re_count,
        mean=tuple(a.mean),
        std=tuple(a.std),
    )
    _patch_posterize(transform)
    return transform


def eval_transform(cfg: ClassifyConfig):
    """timm's eval transform: resize the short side to ``floor(img_size / crop_pct)`` (256 for
    224), centre crop ``img_size``, normalise (datasets.py builds the same by hand)."""
    return create_transform(
        input_size=cfg.model.img_size,
        is_training=False,
        crop_pct=cfg.eval.crop_pct,
        interpolation=cfg.eval.interpolation,
        mean=tuple(cfg.aug.mean),
        std=tuple(cfg.aug.std),
    )


class _Labelled:
    """``transform(image), label``: the per-sample callable ``SeededTransform`` runs."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img, label: int):
        return self.transform(img.convert("RGB")), label


def split_roots(cfg: ClassifyConfig) -> tuple[Path, Path, str]:
    """(train root, val root, a line saying where they are)."""
    d = cfg.data
    if d.path:
        # a run's config.yaml records the path portably ($SKIPLESS_CACHE/..., ~/...): expand it
        root = Path(os.path.expandvars(d.path)).expanduser()
        if not root.is_dir():
            raise DatasetError(f"--data {root}: not a directory.\nExpected layout:\n{LAYOUT}")
        missing = [s for s in SPLITS if not (root / s).is_dir()]
        if missing:
            raise DatasetError(
                f"--data {root}: no {' or '.join(s + '/' for s in missing)} folder in it.\n"
                f"Expected layout:\n{LAYOUT}"
            )
        return root / "train", root / "val", f"ImageFolder {portable_path(str(root))}"
    size = d.synthetic_size
    train = synthetic_root("imagefolder", n=d.synthetic_n, size=size, seed=d.synthetic_seed)
    val = synthetic_root("imagefolder", n=d.synthetic_val_n, size=size, seed=d.synthetic_val_seed)
    where = (
        f"synthetic pattern classes at {size}x{size} px (train: {d.synthetic_n} images, seed "
        f"{d.synthetic_seed}; val: {d.synthetic_val_n}, seed {d.synthetic_val_seed}; cached in "
        f"{portable_path(str(train.parent))}); pass --data ROOT (with train/ and val/) for real data"
    )
    return train, val, where


@dataclass
class Splits:
    train: ImageFolderDataset
    val: ImageFolderDataset
    where: str

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


def load_splits(cfg: ClassifyConfig) -> Splits:
    """Both splits, with one class list (the val folders must be the train folders)."""
    train_root, val_root, where = split_roots(cfg)
    train, val = ImageFolderDataset(train_root), ImageFolderDataset(val_root)
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        raise DatasetError(
            f"{train_root} and {val_root} have different class folders: "
            f"{len(train.classes)} vs {len(val.classes)} (only in train: {only_t[:5]}, only in "
            f"val: {only_v[:5]}); the label of an image is its folder, so both need the same"
        )
    if train.num_classes < 2:
        raise DatasetError(f"{train_root}: {train.num_classes} class folder; a classifier needs 2+")
    return Splits(train, val, where)


class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``, in order, no padding: each val image is scored
    by exactly one process, so the summed counts are the whole set's (main.py's
    DistributedSampler pads with duplicates when the set does not divide)."""

    def __init__(self, n: int, world: int = 1, rank: int = 0):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def train_loader(dataset: Dataset, cfg: ClassifyConfig, world: int, rank: int, pin: bool):
    """(loader of ``(epoch, index)`` keys through ``SeededTransform``, its ``EpochSampler``)."""
    sampler = EpochSampler(len(dataset), world, rank, cfg.run.seed)
    data = SeededTransform(dataset, _Labelled(train_transform(cfg)), cfg.run.seed)
    workers = cfg.data.num_workers
    loader = DataLoader(
        data,
        sampler=sampler,
        batch_size=cfg.data.batch_size_per_gpu,
        num_workers=workers,
        pin_memory=pin,
        drop_last=True,  # main.py
        persistent_workers=workers > 0,
    )
    return loader, sampler


def val_loader(dataset: ImageFolderDataset, cfg: ClassifyConfig, world: int, rank: int, pin: bool):
    dataset.transform = eval_transform(cfg)
    return DataLoader(
        dataset,
        sampler=ShardSampler(len(dataset), world, rank),
        batch_size=cfg.eval_batch,
        num_workers=cfg.data.num_workers,
        pin_memory=pin,
        drop_last=False,  # main.py
    )


def build_mixup(cfg: ClassifyConfig, num_classes: int) -> Mixup | None:
    """``timm.data.Mixup`` as main.py builds it (None when Mixup and CutMix are both off)."""
    m = cfg.mixup
    if not m.active:
        return None
    return Mixup(
        mixup_alpha=m.mixup_alpha,
        cutmix_alpha=m.cutmix_alpha,
        cutmix_minmax=tuple(m.cutmix_minmax) if m.cutmix_minmax else None,
        prob=m.prob,
        switch_prob=m.switch_prob,
        mode=m.mode,
        correct_lam=m.correct_lam,
        label_smoothing=m.label_smoothing,
        num_classes=num_classes,
    )


def build_criterion(cfg: ClassifyConfig) -> nn.Module:
    """main.py's choice: soft-target CE with Mixup (smoothing is in the targets), else label
    smoothing CE, else plain CE (all timm / torch)."""
    if cfg.mixup.active:
        return SoftTargetCrossEntropy()
    if cfg.mixup.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.mixup.label_smoothing)
    return nn.CrossEntropyLoss()


def mix(mixup: Mixup | None, x: torch.Tensor, y: torch.Tensor, key: tuple[int, ...]):
    """``mixup(x, y)`` with its draws (``np.random``) seeded by ``key``; identity if off."""
    if mixup is None:
        return x, y
    with seeded_rngs(*key):
        return mixup(x, y)
