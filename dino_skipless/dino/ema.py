"""EMA teacher update (official DINO: ``param_k = m * param_k + (1 - m) * param_q``)."""

from __future__ import annotations

import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers, in any nesting."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _params(
    teacher: nn.Module, student: nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    t_named = list(_unwrap(teacher).named_parameters())
    s_named = list(_unwrap(student).named_parameters())
    if len(t_named) != len(s_named):
        raise ValueError(
            f"ema_update_: teacher has {len(t_named)} parameters, student {len(s_named)}; "
            "they must be the same architecture"
        )
    for (tn, tp), (sn, sp) in zip(t_named, s_named):
        if tn != sn or tp.shape != sp.shape:
            raise ValueError(
                f"ema_update_: parameter mismatch teacher {tn} {tuple(tp.shape)} vs "
                f"student {sn} {tuple(sp.shape)}"
            )
    return [p.detach() for _, p in t_named], [p.detach() for _, p in s_named]


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: every teacher parameter <- m * teacher + (1 - m) * student (same names, order).

    ``student`` (and ``teacher``) may be DDP- or torch.compile-wrapped. Buffers are not
    averaged, as upstream (the ViT and DINO head have none without BatchNorm).
    """
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"ema_update_: momentum must be in [0, 1], got {momentum}")
    t_params, s_params = _params(teacher, student)
    if not t_params:
        return
    if hasattr(torch, "_foreach_mul_") and hasattr(torch, "_foreach_add_"):
        # One multi-tensor kernel per op instead of two launches per parameter.
        torch._foreach_mul_(t_params, m)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - m)
    else:  # pragma: no cover - very old torch
        for tp, sp in zip(t_params, s_params):
            tp.mul_(m).add_(sp, alpha=1.0 - m)
