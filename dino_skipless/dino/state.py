"""The state of one pretraining run, shared by the trainer and the checkpoint module.

``train`` builds a ``RunState`` once; ``train_one_epoch`` advances it; ``checkpoint`` saves it
and restores it on ``--resume``. It lives here, not in ``trainer``, so that ``checkpoint`` can
import it without importing the trainer that imports ``checkpoint``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .collapse import CollapseMonitor
from .config import PretrainConfig
from .distributed import DistEnv
from .head import MultiCropWrapper
from .loss import DINOLoss
from .monitor import KNNMonitor
from .runlog import RunLogger
from .sampling import EpochSampler


def _clock() -> float:
    return time.monotonic()


@dataclass
class RunState:
    """Everything ``train_one_epoch`` touches (built once by ``train``)."""

    cfg: PretrainConfig
    env: DistEnv
    log: RunLogger
    loader: DataLoader
    sampler: EpochSampler
    niter_per_ep: int
    student: MultiCropWrapper  # unwrapped (state dicts, EMA source)
    teacher: MultiCropWrapper
    student_fwd: nn.Module  # DDP and/or compiled student
    teacher_fwd: nn.Module
    forward_loss: object  # run.compile_step: compiled (crops, teacher_temp) -> loss; else None
    loss_fn: DINOLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # disabled (a pass-through) unless fp16
    schedules: object
    precision: str
    meta: dict
    out_dir: Path
    step: int = 0  # global step of the next iteration
    nonfinite_skipped: int = 0
    losses: list[float] = field(default_factory=list)
    collapse: CollapseMonitor = field(default_factory=CollapseMonitor)
    # Carried in the checkpoint, so a resumed run reports as an uninterrupted one:
    bad_images: dict = field(default_factory=lambda: {"total": 0, "epoch": 0})
    epoch_loss: dict = field(default_factory=lambda: {"sum": 0.0, "count": 0})
    elapsed_before: float = 0.0  # training seconds of earlier processes of this run
    t_start: float = 0.0  # _clock() when this process started training
    saved_step: int | None = None  # step of DIR/checkpoint.pt; None: none written yet
    monitor: KNNMonitor | None = None  # the online k-NN monitor (main process only)
    knn_last: float | None = None  # its last top-1, for the progress bar

    def start_clock(self) -> None:
        self.t_start = _clock()

    def elapsed(self) -> float:
        return self.elapsed_before + _clock() - self.t_start
