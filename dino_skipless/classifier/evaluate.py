"""Validation top-1 / top-5 and loss of a classifier (the weight-selection code's ``engine.evaluate``).

Counts, not per-batch percentages: every process scores its own shard of the val set
(``data.ShardSampler``), the counts are summed over processes, and the accuracies are exact
for the whole set whatever the batch size or the number of processes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..dino.distributed import is_dist
from ..dino.trainer import autocast


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    """How many rows have ``target`` among their ``k`` largest logits, for each ``k`` (a ``k``
    above the number of classes counts every row, as timm's ``accuracy`` clamps it)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (n, kmax), largest first
    hit = top == target.view(-1, 1)
    return [int(hit[:, : min(k, kmax)].any(1).sum()) for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, precision: str = "fp32", ks=(1, 5)
) -> dict:
    """``{"top1", "top5" (in %), "loss" (mean cross-entropy), "n"}`` over the whole val set."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(ks) + 2, dtype=torch.float64, device=device)  # hits..., loss, n
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(x)
        logits = logits.float()
        hits = topk_correct(logits, y, ks)
        loss = F.cross_entropy(logits, y, reduction="sum")
        sums += torch.tensor([*hits, float(loss), len(y)], dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    model.train(was_training)
    n = int(sums[-1])
    out = {f"top{k}": 100.0 * float(sums[i]) / max(n, 1) for i, k in enumerate(ks)}
    out["loss"] = float(sums[-2]) / max(n, 1)
    out["n"] = n
    return out
