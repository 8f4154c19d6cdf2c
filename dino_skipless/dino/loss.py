"""DINO loss: teacher-centred, temperature-sharpened cross-entropy over view pairs.

Follows the official ``DINOLoss`` (facebookresearch/dino main_dino.py): the teacher sees the
``n_global`` global views, the student all ``n_crops`` views; every (teacher view iq,
student view v) pair with v != iq contributes mean_b(-sum_k q log p), and the sum is divided by
the number of pairs (2 * 10 - 2 = 18 for the default 2 + 8 crops).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _check_shapes(
    student_out: torch.Tensor, teacher_out: torch.Tensor, n_crops: int, n_global: int
):
    if student_out.ndim != 2 or teacher_out.ndim != 2:
        raise ValueError(
            "dino_loss expects 2-D logits (views*batch, K), got student "
            f"{tuple(student_out.shape)} and teacher {tuple(teacher_out.shape)}"
        )
    if not 1 <= n_global <= n_crops:
        raise ValueError(f"dino_loss needs 1 <= n_global <= n_crops, got {n_global} and {n_crops}")
    if student_out.shape[0] % n_crops:
        raise ValueError(
            f"dino_loss: student rows {student_out.shape[0]} are not a multiple of n_crops={n_crops}"
        )
    batch = student_out.shape[0] // n_crops
    if teacher_out.shape != (n_global * batch, student_out.shape[1]):
        raise ValueError(
            f"dino_loss: teacher logits must be (n_global*B, K) = ({n_global * batch}, "
            f"{student_out.shape[1]}) for student {tuple(student_out.shape)} with n_crops={n_crops}, "
            f"got {tuple(teacher_out.shape)}"
        )
    return batch


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float | torch.Tensor,
    student_temp: float = 0.1,
    n_crops: int = 10,
    n_global: int = 2,
) -> torch.Tensor:
    """DINO cross-entropy; rows are view-major (view 0's batch, then view 1's, ...) as upstream.

    The teacher targets are detached. Computed without materialising every pair: for teacher
    view i, sum_{v != i} log p_v = (sum_v log p_v) - log p_i, which is identical to the
    upstream double loop but touches each (B, K) block once.
    """
    batch = _check_shapes(student_out, teacher_out, n_crops, n_global)
    k = student_out.shape[1]
    logp = F.log_softmax(student_out.float() / student_temp, dim=-1).view(n_crops, batch, k)
    with torch.no_grad():
        q = F.softmax((teacher_out.float() - center.float()) / teacher_temp, dim=-1)
        q = q.view(n_global, batch, k)
    others = logp.sum(dim=0).unsqueeze(0) - logp[:n_global]  # (n_global, B, K)
    n_pairs = n_global * n_crops - n_global
    if n_pairs == 0:
        raise ValueError("dino_loss: no (teacher, student) view pairs with different views")
    return -(q * others).sum(dim=-1).mean(dim=-1).sum() / n_pairs


@torch.no_grad()
def entropy_pair(
    teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float | torch.Tensor
) -> torch.Tensor:
    """``teacher_entropies`` as a ``(2,)`` tensor on the logits' device: the trainer keeps it
    there until a logging step (reading it every step would make the host wait for the GPU)."""
    q = F.softmax((teacher_out.float() - center.float()) / teacher_temp, dim=-1)
    per_row = -(q * q.clamp_min(1e-30).log()).sum(dim=-1).mean()
    mean_q = q.mean(dim=0)
    of_mean = -(mean_q * mean_q.clamp_min(1e-30).log()).sum()
    return torch.stack([per_row, of_mean])


def teacher_entropies(
    teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float
) -> tuple[float, float]:
    """Collapse monitor (DINO paper Sec. 5.3, Fig. 7): ``(mean_b H(q_b), H(mean_b q_b))`` in nats.

    q_b is the centred, sharpened teacher distribution of row b. Both near ln K: uniform
    collapse (every image gets the same flat target); both near 0: one-dimension collapse;
    a healthy run keeps the first well below ln K and the second near ln K (the targets are
    sharp and different images use different dimensions).
    """
    per_row, of_mean = entropy_pair(teacher_out, center, teacher_temp).tolist()
    return per_row, of_mean


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_epochs: int, n_epochs: int
) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up then constant (upstream formula).

    A warm-up longer than the run is truncated to ``n_epochs`` entries (short CPU runs).
    """
    if n_epochs <= 0 or warmup_epochs < 0:
        raise ValueError(
            f"teacher temperature schedule needs n_epochs > 0 and warmup_epochs >= 0, "
            f"got {n_epochs} and {warmup_epochs}"
        )
    sched = np.concatenate(
        (
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
            np.ones(max(n_epochs - warmup_epochs, 0)) * teacher_temp,
        )
    )
    return sched[:n_epochs]


class DINOLoss(nn.Module):
    """Stateful DINO loss: teacher-temperature schedule and the EMA ``center`` buffer.

    Defaults: official ViT-S/16 boosted recipe (``--warmup_teacher_temp 0.04 --teacher_temp 0.07
    --warmup_teacher_temp_epochs 30 --epochs 300``, student_temp 0.1, center_momentum 0.9).
    """

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 30,
        n_epochs: int = 300,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        n_global: int = 2,
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.n_crops = n_crops
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        # (per-row teacher entropy, entropy of the batch-mean target) of the last call, this rank
        self.last_entropies = torch.full((2,), float("nan"))
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, n_epochs
        )

    def teacher_temp_at(self, epoch: int) -> float:
        """Scheduled temperature; epochs past the schedule keep its last value."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return float(
            self.teacher_temp_schedule[min(int(epoch), len(self.teacher_temp_schedule) - 1)]
        )

    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor,
        epoch: int,
        teacher_temp: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss at ``epoch``'s scheduled teacher temperature (or ``teacher_temp``: a tensor
        keeps a compiled step from specialising on the epoch). Logits are upcast to fp32, so
        both softmaxes run in fp32 under autocast (as DINOv2's loss)."""
        temp = self.teacher_temp_at(epoch) if teacher_temp is None else teacher_temp
        loss = dino_loss(
            student_out.float(),
            teacher_out.float(),
            self.center,
            temp,
            self.student_temp,
            self.n_crops,
            self.n_global,
        )
        # a (2,) tensor on the device: read on logging steps only
        self.last_entropies = entropy_pair(teacher_out, self.center, temp)
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean of teacher rows over all ranks."""
        teacher_out = teacher_out.detach().float()
        batch_center = teacher_out.sum(dim=0, keepdim=True)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center, op=dist.ReduceOp.SUM)
            world_size = dist.get_world_size()
        batch_center = batch_center / (len(teacher_out) * world_size)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
