"""DINO loss: teacher-centred, temperature-sharpened cross-entropy over view pairs.

Follows the official ``DINOLoss`` (facebookresearch/dino main_dino.py): the teacher sees the
``n_global`` global views, the student all ``n_crops`` views; every (teacher view iq,
student view v) pair with v != iq contributes mean_b(-sum_k q log p), and the sum is divided by
the number of pairs (2 * 10 - 2 = 18 for the default 2 + 8 crops).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# "centering": DINO's EMA centre + sharpened softmax (the published recipe, the default);
# "sinkhorn_knopp": DINOv2 / SwAV's equipartition of the batch over the prototypes, the remedy
# when the random teacher starts with almost no information about the images.
CENTERINGS = ("centering", "sinkhorn_knopp")
KOLEO_FEATURES = ("backbone", "bottleneck")  # dino.koleo_features


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
    """DINO cross-entropy with the published centring; rows are view-major (view 0's batch,
    then view 1's, ...) as upstream. The teacher targets are detached."""
    _check_shapes(student_out, teacher_out, n_crops, n_global)
    with torch.no_grad():
        q = centered_targets(teacher_out, center, teacher_temp)
    return cross_entropy_over_views(student_out, q, student_temp, n_crops, n_global)


def cross_entropy_over_views(
    student_out: torch.Tensor,
    targets: torch.Tensor,
    student_temp: float = 0.1,
    n_crops: int = 10,
    n_global: int = 2,
) -> torch.Tensor:
    """mean over (teacher view i, student view v != i) pairs of mean_b(-sum_k q log p).

    Computed without materialising every pair: for teacher view i, sum_{v != i} log p_v =
    (sum_v log p_v) - log p_i, which is identical to the upstream double loop but touches each
    (B, K) block once."""
    batch = _check_shapes(student_out, targets, n_crops, n_global)
    k = student_out.shape[1]
    logp = F.log_softmax(student_out.float() / student_temp, dim=-1).view(n_crops, batch, k)
    q = targets.float().view(n_global, batch, k)
    others = logp.sum(dim=0).unsqueeze(0) - logp[:n_global]  # (n_global, B, K)
    n_pairs = n_global * n_crops - n_global
    if n_pairs == 0:
        raise ValueError("dino_loss: no (teacher, student) view pairs with different views")
    return -(q * others).sum(dim=-1).mean(dim=-1).sum() / n_pairs


@torch.no_grad()
def centered_targets(
    teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float
) -> torch.Tensor:
    """DINO's teacher target: softmax((t - center) / T) per row."""
    return F.softmax((teacher_out.float() - center.float()) / teacher_temp, dim=-1)


def _global_logsumexp_rows(logq: torch.Tensor, distributed: bool) -> torch.Tensor:
    """``(K, 1)`` log of each row's sum over the columns of every process."""
    top = logq.max(dim=1, keepdim=True).values
    if distributed:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.exp(logq - top).sum(dim=1, keepdim=True)
    if distributed:
        dist.all_reduce(total)
    return top + total.log()


@torch.no_grad()
def sinkhorn_knopp_targets(
    teacher_out: torch.Tensor, teacher_temp: float, n_iterations: int = 3
) -> torch.Tensor:
    """DINOv2's teacher target (``SinkhornKnoppTeacher``, as SwAV): the ``(B, K)`` logits / T,
    exponentiated and alternately normalised so that every prototype gets 1/K of the batch's
    mass and every image 1/B (``n_iterations`` rounds, DINOv2: 3); rows then sum to 1.

    Unlike centring, this *forces* the batch to spread over the prototypes, so the target keeps
    information about the image even when the random teacher barely tells images apart
    (low-variety data). Under DDP the sums over images run over all processes, as upstream.
    The same arithmetic as upstream, in log space: upstream's ``exp(x / T)`` overflows float32
    once x / T > 88 and a prototype that every image scores far below the others underflows
    to a row of zeros (0 / 0); normalising log-sums avoids both."""
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    logq = (teacher_out.float() / teacher_temp).t()  # (K, B), as upstream
    n_protos, n_images = logq.shape[0], logq.shape[1] * world
    # upstream first divides by the total; the row normalisation below makes that a no-op
    for _ in range(n_iterations):
        logq = logq - _global_logsumexp_rows(logq, distributed) - math.log(n_protos)
        # per image (local: an image lives on one process)
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True) - math.log(n_images)
    return torch.exp(logq + math.log(n_images)).t()  # columns sum to 1: one per image


@torch.no_grad()
def target_entropies(q: torch.Tensor) -> tuple[float, float]:
    """Collapse monitor (DINO paper Sec. 5.3, Fig. 7): ``(mean_b H(q_b), H(mean_b q_b))`` in
    nats, of the ``(B, K)`` teacher targets actually used.

    Both near ln K: uniform collapse (every image gets the same flat target); both near 0:
    one-dimension collapse; a healthy run keeps the first well below ln K and the second near
    ln K (the targets are sharp and different images use different dimensions).
    """
    per_row, of_mean = target_entropy_pair(q).tolist()
    return per_row, of_mean


@torch.no_grad()
def target_entropy_pair(q: torch.Tensor) -> torch.Tensor:
    """``target_entropies`` as a ``(2,)`` tensor on ``q``'s device: the trainer keeps it there
    until a logging step (reading it every step would make the host wait for the GPU)."""
    q = q.float()
    per_row = -(q * q.clamp_min(1e-30).log()).sum(dim=-1).mean()
    mean_q = q.mean(dim=0)
    of_mean = -(mean_q * mean_q.clamp_min(1e-30).log()).sum()
    return torch.stack([per_row, of_mean])


@torch.no_grad()
def teacher_entropies(
    teacher_out: torch.Tensor, center: torch.Tensor, teacher_temp: float
) -> tuple[float, float]:
    """``target_entropies`` of the centred, sharpened teacher distribution."""
    return target_entropies(centered_targets(teacher_out, center, teacher_temp))


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser (Sablayrolles et al. 2019, ``KoLeoLoss``): ``-mean_i log
    d(x_i, x_nn(i))`` over the L2-normalised rows, nn(i) the row closest to row i. Minimising it
    spreads the images' features apart: on low-variety data it creates the differences between
    images that the teacher's targets need. In fp32 (upstream disables autocast)."""
    x = F.normalize(features.float(), eps=eps, p=2, dim=-1)
    dots = x @ x.t()
    dots.fill_diagonal_(-1)  # a row is not its own neighbour
    nearest = dots.argmax(dim=1)
    return -torch.log(F.pairwise_distance(x, x[nearest], p=2, eps=eps) + eps).mean()


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
        centering: str = "centering",
        sk_iterations: int = 3,
    ) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.centering = centering
        self.sk_iterations = sk_iterations
        self.teacher_temp_scale = 1.0  # dino.teacher_temp_min_info's factor (calibrate.py)
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

    @torch.no_grad()
    def teacher_targets(
        self,
        teacher_out: torch.Tensor,
        epoch: int,
        teacher_temp: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The ``(n_global * B, K)`` targets: centred softmax (DINO) or Sinkhorn-Knopp, at
        ``epoch``'s scheduled temperature unless ``teacher_temp`` is given."""
        temp = self.teacher_temp_at(epoch) if teacher_temp is None else teacher_temp
        if self.centering == "sinkhorn_knopp":
            # over both global views' rows at once, as DINOv2's ssl_meta_arch
            return sinkhorn_knopp_targets(teacher_out, temp, self.sk_iterations)
        return centered_targets(teacher_out, self.center, temp)

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
        _check_shapes(student_out, teacher_out, self.n_crops, self.n_global)
        q = self.teacher_targets(teacher_out, epoch, teacher_temp)
        loss = cross_entropy_over_views(
            student_out.float(), q, self.student_temp, self.n_crops, self.n_global
        )
        # a (2,) tensor on the device: read on logging steps only
        self.last_entropies = target_entropy_pair(q)
        if self.centering == "centering":  # DINOv2 keeps no centre with Sinkhorn-Knopp
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
