"""DINO multi-crop augmentation (Caron et al. 2021, official ``DataAugmentationDINO``).

Two global views and ``n_local`` local views per image, each with its own random crop,
flip, colour jitter and grayscale; Gaussian blur and solarisation differ per view exactly as
in the official code (blur p=1.0 / 0.1 / 0.5 for global 1 / global 2 / locals, solarise p=0.2
on global 2 only). Crop/flip/jitter draw from torch's RNG and blur/solarise from Python's
``random`` (as upstream), so reproducing a sample needs both ``torch.manual_seed`` and
``random.seed`` (a DataLoader worker seeds both).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from ..ranges import (
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    check_fields,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugConfig:
    """Multi-crop recipe; defaults = official DINO ViT-S/16 (facebookresearch/dino main_dino.py)."""

    global_size: PositiveInt = 224  # DataAugmentationDINO: RandomResizedCrop(224, ...) (global)
    local_size: PositiveInt = 96  # RandomResizedCrop(96, ...) for local views
    global_scale: tuple[PositiveFloat, PositiveFloat] = (0.4, 1.0)  # --global_crops_scale default
    local_scale: tuple[PositiveFloat, PositiveFloat] = (0.05, 0.4)  # --local_crops_scale default
    n_local: NonNegInt = 8  # --local_crops_number default
    flip_p: Probability = 0.5  # RandomHorizontalFlip(p=0.5)
    # ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1) inside RandomApply(p=0.8)
    jitter: tuple[NonNegFloat, NonNegFloat, NonNegFloat, NonNegFloat] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: Probability = 0.8
    grayscale_p: Probability = 0.2  # RandomGrayscale(p=0.2)
    blur_p_global1: Probability = 1.0  # utils.GaussianBlur(1.0) on global view 1
    blur_p_global2: Probability = 0.1  # utils.GaussianBlur(0.1) on global view 2
    blur_p_local: Probability = 0.5  # utils.GaussianBlur(p=0.5) on local views
    blur_sigma: tuple[PositiveFloat, PositiveFloat] = (0.1, 2.0)  # radius_min/radius_max
    solarize_p_global2: Probability = 0.2  # utils.Solarization(0.2), global view 2 only
    # RandomResizedCrop's torchvision default aspect-ratio range (upstream does not set it)
    ratio: tuple[PositiveFloat, PositiveFloat] = (3.0 / 4.0, 4.0 / 3.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # transforms.Normalize ImageNet statistics
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """``ValueError`` naming the first bad value: ranges (the field types), then the
        (lo, hi) pairs."""
        check_fields(self, "aug.")
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"aug.{name} must be (lo, hi) with lo <= hi, got {(lo, hi)}")
        if len(self.jitter) != 4:
            raise ValueError(
                f"aug.jitter must be (brightness, contrast, saturation, hue), got {self.jitter}"
            )
        if self.jitter[3] > 0.5:  # torchvision's ColorJitter: hue in [0, 0.5]
            raise ValueError(f"aug.jitter's hue must be in [0, 0.5], got {self.jitter[3]}")


class GaussianBlur:
    """PIL Gaussian blur with probability ``p``, radius ~ U(radius_min, radius_max) (as upstream)."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        # `<=` as upstream, so p=1 always blurs; the radius is only drawn when blurring.
        if random.random() <= self.p:
            radius = random.uniform(self.radius_min, self.radius_max)
            return img.filter(ImageFilter.GaussianBlur(radius=radius))
        return img

    def __repr__(self) -> str:
        return f"GaussianBlur(p={self.p}, radius=({self.radius_min}, {self.radius_max}))"


class Solarization:
    """PIL solarisation (threshold 128) with probability ``p`` (as upstream)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return ImageOps.solarize(img)  # default threshold=128
        return img

    def __repr__(self) -> str:
        return f"Solarization(p={self.p})"


class MultiCropAugmentation:
    """``aug(pil_img) -> [global1, global2, local_1, ..., local_n]`` float32 normalised CHW."""

    def __init__(self, cfg: AugConfig | None = None) -> None:
        self.cfg = cfg = cfg if cfg is not None else AugConfig()
        bicubic = transforms.InterpolationMode.BICUBIC

        def crop(size: int, scale: tuple[float, float]) -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(
                size, scale=tuple(scale), ratio=tuple(cfg.ratio), interpolation=bicubic
            )

        b, c, s, h = cfg.jitter
        flip_and_color_jitter = [
            transforms.RandomHorizontalFlip(p=cfg.flip_p),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)],
                p=cfg.jitter_p,
            ),
            transforms.RandomGrayscale(p=cfg.grayscale_p),
        ]
        normalize = [transforms.ToTensor(), transforms.Normalize(cfg.mean, cfg.std)]
        lo, hi = cfg.blur_sigma
        self.global1 = transforms.Compose(
            [crop(cfg.global_size, cfg.global_scale), *flip_and_color_jitter]
            + [GaussianBlur(cfg.blur_p_global1, lo, hi), *normalize]
        )
        self.global2 = transforms.Compose(
            [crop(cfg.global_size, cfg.global_scale), *flip_and_color_jitter]
            + [GaussianBlur(cfg.blur_p_global2, lo, hi), Solarization(cfg.solarize_p_global2)]
            + normalize
        )
        self.local = transforms.Compose(
            [crop(cfg.local_size, cfg.local_scale), *flip_and_color_jitter]
            + [GaussianBlur(cfg.blur_p_local, lo, hi), *normalize]
        )

    @property
    def n_crops(self) -> int:
        return 2 + int(self.cfg.n_local)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        if not isinstance(img, Image.Image):
            raise TypeError(
                f"MultiCropAugmentation expects a PIL image, got {type(img).__name__} "
                "(load images with PIL, e.g. an ImageFolder without a tensor transform)"
            )
        if img.mode != "RGB":
            img = img.convert("RGB")
        crops = [self.global1(img), self.global2(img)]
        crops.extend(self.local(img) for _ in range(int(self.cfg.n_local)))
        return crops

    def __repr__(self) -> str:
        return f"MultiCropAugmentation({self.cfg})"
