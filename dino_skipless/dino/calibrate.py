"""A teacher temperature chosen from the information the random teacher has at the start.

On low-variety images (upscaled digits, documents, medical or satellite tiles) a random ViT
gives every image nearly the same features, so at the published teacher temperature (0.04) the
centred target carries only a few tenths of a nat about the image (about 1 nat on the pattern
world and on photographs), and DINO falls into the uniform collapse within a few hundred steps
(README, "A remedy for low-information images"). Sharpening the teacher amplifies what little
the logits tell images apart. ``dino.teacher_temp_min_info`` asks for at least that much
information at step 0: before training, the teacher's outputs on the first batches of epoch 0
(both global views, the run's own crops) are turned into targets exactly as the loss will
(centred by their mean -- the centre's value a few steps in -- or Sinkhorn-Knopp), and both
temperatures of the schedule are scaled by the largest factor in ``SCALES`` (<= 1) that reaches
the target. A run whose start is already informative keeps its temperatures, bit for bit.

Not in DINO or DINOv2. Measured, not tuned per variant: the factor depends on the data and the
initial network only, and is logged, stored in the checkpoint (exact resume) and in
``summary.json``.
"""

from __future__ import annotations

import numpy as np
import torch

from .loss import DINOLoss, centered_targets, sinkhorn_knopp_targets, target_entropies

# Candidate factors of the temperature: 1, then down by 2^(-1/4) per step to ~1/16.
SCALES = tuple(float(2 ** (-k / 4)) for k in range(17))
N_BATCHES = 4  # calibration batches of the training batch size


def target_information(
    logits: list[torch.Tensor], temp: float, centering: str, sk_iterations: int = 3
) -> float:
    """Mean over batches of H(mean_b q_b) - mean_b H(q_b): the nats the targets carry about the
    image (``collapse.target_information``), for teacher logits ``(2B, K)`` per batch."""
    center = torch.cat(logits).mean(dim=0, keepdim=True)
    infos = []
    for t in logits:
        if centering == "sinkhorn_knopp":
            q = sinkhorn_knopp_targets(t, temp, sk_iterations)
        else:
            q = centered_targets(t, center, temp)
        h, hb = target_entropies(q)
        infos.append(hb - h)
    return float(np.mean(infos))


def information_curve(
    logits: list[torch.Tensor], temp: float, centering: str, sk_iterations: int = 3
) -> list[float]:
    """``target_information`` at ``f * temp`` for every factor f of ``SCALES``."""
    return [target_information(logits, f * temp, centering, sk_iterations) for f in SCALES]


def pick_scale(curve: list[float], min_info: float) -> tuple[float, float, float]:
    """(factor, information at factor 1, information at the factor): the largest factor of
    ``SCALES`` whose targets carry >= ``min_info`` nats, else the smallest factor."""
    for f, info in zip(SCALES, curve):
        if info >= min_info:
            return f, curve[0], info
    return SCALES[-1], curve[0], curve[-1]


def apply_scale(loss_fn: DINOLoss, factor: float) -> None:
    """Scale the whole teacher-temperature schedule (warm-up included) by ``factor``."""
    loss_fn.teacher_temp_schedule = loss_fn.teacher_temp_schedule * factor
    loss_fn.teacher_temp_scale = factor
