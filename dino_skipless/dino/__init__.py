"""DINO building blocks: multi-crop augmentation, head, loss with centering, EMA teacher."""

from .augment import AugConfig, MultiCropAugmentation
from .ema import ema_update_
from .head import DINOHead, MultiCropWrapper
from .loss import DINOLoss, dino_loss

__all__ = [
    "AugConfig",
    "MultiCropAugmentation",
    "DINOHead",
    "MultiCropWrapper",
    "dino_loss",
    "DINOLoss",
    "ema_update_",
]
