"""Supervised training of the paper's classifiers (Sec. 6.1, Table 1, Fig. 1).

``config`` (the recipe of Xu et al. 2024 with its sources), ``data`` (timm's pipeline, seeded
per sample), ``loop`` (the one supervised loop, shared with the small-scale ceilings of
``dino_skipless.supervised``), ``evaluate`` (top-1 / top-5), ``trainer`` (``train``), ``curves``
(Fig. 1). Command lines: ``python -m dino_skipless.classify`` and
``python -m dino_skipless.loss_curves``.
"""

from .config import ClassifyConfig, build_config
from .trainer import ClassifyResult, train

__all__ = ["ClassifyConfig", "ClassifyResult", "build_config", "train"]
