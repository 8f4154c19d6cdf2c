"""DINO's per-iteration schedules and gradient surgery (facebookresearch/dino, ``utils.py``).

``cosine_scheduler``, the linear scaling rule and ``cancel_gradients_last_layer`` reproduce the
official code exactly. ``clip_gradients`` computes the same per-parameter clipping as the
official loop (``coef = clip / (||g|| + 1e-6)``, applied when ``coef < 1``) with bit-identical
results, but without a device->host sync per parameter: all norms come from one
``torch._foreach_norm`` call and the clipping is one ``torch._foreach_mul_``. It returns the
norms as a tensor (the official code returns a list of Python floats, one ``.item()`` sync each);
call ``.tolist()`` only when logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0,
) -> np.ndarray:
    """Official DINO schedule: one value per iteration, ``epochs * niter_per_ep`` in total.

    Linear warm-up ``start_warmup_value -> base_value`` (``np.linspace``, both ends included) over
    ``warmup_epochs * niter_per_ep`` iterations, then
    ``final + 0.5 (base - final) (1 + cos(pi i / n))`` for ``i = 0..n-1`` over the remaining ``n``.
    """
    if epochs < 0 or niter_per_ep < 0 or warmup_epochs < 0:
        raise ValueError(
            f"cosine_scheduler: epochs, niter_per_ep and warmup_epochs must be >= 0, got "
            f"{epochs}, {niter_per_ep}, {warmup_epochs}"
        )
    if warmup_epochs > epochs:
        raise ValueError(
            f"cosine_scheduler: warmup_epochs ({warmup_epochs}) exceeds epochs ({epochs})"
        )
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / max(len(iters), 1))
    )
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def scaled_lr(lr: float, total_batch: int) -> float:
    """DINO's linear scaling rule: ``lr * total_batch / 256`` (main_dino.py)."""
    return lr * total_batch / 256.0


@dataclass
class Schedules:
    """Per-iteration values, indexed by the global iteration ``epoch * niter_per_ep + it``."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray | None = None  # DINO's teacher momentum; None for supervised runs

    def __len__(self) -> int:
        return len(self.lr)

    def at(self, it: int) -> dict[str, float]:
        if not 0 <= it < len(self.lr):
            raise IndexError(f"iteration {it} outside the schedule (0..{len(self.lr) - 1})")
        out = {"lr": float(self.lr[it]), "wd": float(self.wd[it])}
        if self.momentum is not None:
            out["momentum"] = float(self.momentum[it])
        return out


def build_schedules(
    *,
    lr: float,
    min_lr: float,
    warmup_epochs: int,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    epochs: int,
    niter_per_ep: int,
    total_batch: int,
) -> Schedules:
    """The three schedules of DINO's ``main_dino.py`` (lr scaled by ``total_batch / 256``)."""
    return Schedules(
        lr=cosine_scheduler(
            scaled_lr(lr, total_batch), min_lr, epochs, niter_per_ep, warmup_epochs=warmup_epochs
        ),
        wd=cosine_scheduler(weight_decay, weight_decay_end, epochs, niter_per_ep),
        momentum=cosine_scheduler(momentum_teacher, 1, epochs, niter_per_ep),
    )


def apply_schedules_(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """As DINO: every group's lr; weight decay only for group 0 (the regularised one)."""
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if i == 0:
            group["weight_decay"] = wd


def clip_gradients(model: nn.Module, clip: float) -> torch.Tensor:
    """DINO's per-parameter clipping; returns the pre-clip norms, one per parameter with a grad.

    Per parameter ``coef = clip / (||g||_2 + 1e-6)``; ``g *= coef`` when ``coef < 1``. Using
    ``min(coef, 1)`` everywhere is identical (``g * 1.0 == g`` exactly) and needs no sync.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    if hasattr(torch, "_foreach_norm"):
        norms = torch._foreach_norm(grads, 2)
    else:  # pragma: no cover - very old torch
        norms = [g.norm(2) for g in grads]
    # ``clip / tensor`` is the expression the official code evaluates: same rounding.
    if len({(n.device, n.dtype) for n in norms}) == 1:
        stacked = torch.stack(norms)
        coefs = list((clip / (stacked + 1e-6)).clamp(max=1.0).unbind())
    else:  # grads on several devices / dtypes
        stacked = torch.stack([n.float().cpu() for n in norms])
        coefs = [(clip / (n + 1e-6)).clamp(max=1.0) for n in norms]
    if hasattr(torch, "_foreach_mul_"):
        torch._foreach_mul_(grads, coefs)
    else:  # pragma: no cover
        for g, c in zip(grads, coefs):
            g.mul_(c)
    return stacked


def cancel_gradients_last_layer(epoch: int, model: nn.Module, freeze_last_layer: int) -> None:
    """Drop the DINO head's last-layer gradients during the first ``freeze_last_layer`` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
