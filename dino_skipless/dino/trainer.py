"""The DINO training loop (Caron et al. 2021, official ``main_dino.py``), read top to bottom.

``train(cfg)`` builds the data, the student and the EMA teacher, the loss, the optimizer and the
schedules, optionally resumes, then runs ``train_one_epoch`` until ``cfg.optim.epochs``.
One iteration (global step ``it = epoch * niter_per_ep + i``), as the official code:

1. lr / weight decay / teacher momentum of iteration ``it`` (cosine schedules);
2. teacher on the 2 global crops, student on all crops, ``DINOLoss(epoch)`` (updates the centre
   with the all-reduced teacher mean);
3. a non-finite loss stops the run (naming the step; the last checkpoint is left as it was) or,
   with ``run.on_nonfinite: skip``, is counted and the step is skipped;
4. backward (GradScaler with fp16), per-parameter gradient clipping, last layer's gradient
   dropped during the first ``freeze_last_layer`` epochs, optimizer step;
5. EMA teacher update with the scheduled momentum; the collapse alarm (``collapse.py``: the
   teacher target's information about the image, every step); logging; checkpoints.

Data order and augmentations are a pure function of ``(seed, epoch, index)`` (``sampling``), so
a mid-epoch resume replays exactly and N processes see the crops of one process.

A step never waits for the device: the loss and the collapse monitor's entropies stay on the
device (``_Pending``) and are read back, all-reduced over processes in one collective, on
logging steps (and before a checkpoint or a ``run.max_steps`` stop). So a non-finite loss stops
the run at the next logging step, naming the step where it first occurred, before any checkpoint
could hold it; ``run.on_nonfinite: skip`` must decide before the optimizer step and reads the
loss every step. ``dino_skipless.dino.hostsync`` counts the calls that would wait (tested).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from ..data import DatasetError, ImageFolderDataset
from ..data.files import set_max_image_pixels
from ..data.worlds import pretrain_root
from ..fileio import atomic_write_text, portable_path, write_json
from ..jacobian_lib import layer_condition_numbers
from ..models import build_model
from ..optim import build_optimizer, get_param_groups
from ..outdir import claim_out_dir
from . import DINOHead, DINOLoss, MultiCropAugmentation, MultiCropWrapper, ema_update_
from .augment_device import SeededDecode, collate_decoded, device_multicrop
from .calibrate import N_BATCHES, apply_scale, information_curve, pick_scale
from .checkpoint import (
    CHECKPOINT,
    FORMAT_VERSION,
    INIT_DIR,
    export_backbone,
    remove_stale_temp_files,
    resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .collapse import ADVICE, CollapseError, CollapseMonitor
from .config import ConfigError, PretrainConfig, augment_on_for
from .decode import REPLACED, UNUSABLE, too_many_message, unusable_message
from .distributed import DistEnv, all_reduce_mean, barrier, init_distributed
from .loss import koleo_loss
from .monitor import (
    KNN_LOG,
    KNNMonitor,
    holdout_split,
    learned_verdict,
    monitor_sets,
    verdict_line,
)
from .runlog import RunLogger, memory_gb, progress_bar, read_jsonl, rotate_logs
from .sampling import EpochSampler, SeededMultiCrop
from .schedules import (
    apply_schedules_,
    build_schedules,
    cancel_gradients_last_layer,
    clip_gradients,
    scaled_lr,
)
from .state import RunState

STAGE = "dino_skipless.pretrain"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the checkpoint left intact."""


class PretrainOOMError(RuntimeError):
    """CUDA ran out of memory; the message suggests a per-GPU batch that should fit."""


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # global steps done
    epoch: int  # epochs fully done
    final_loss: float | None
    nonfinite_skipped: int = 0
    stopped_early: bool = False  # run.max_steps reached
    losses: list[float] = field(default_factory=list)  # every loss of this process's steps
    collapse: dict = field(default_factory=dict)  # CollapseMonitor.summary()
    bad_images_skipped: int = 0  # data.on_error=skip replacements, all processes


# ---------------------------------------------------------------------------------------------
# Data (order and crops: ``sampling``)
# ---------------------------------------------------------------------------------------------


def build_base_dataset(cfg: PretrainConfig, env: DistEnv, log: RunLogger) -> ImageFolderDataset:
    """ImageFolder at ``data.path``, or the cached small world (announced loudly)."""
    d = cfg.data
    set_max_image_pixels(d.max_image_pixels)  # in the environment: loader workers see it
    if d.path:
        base = ImageFolderDataset(d.path)  # DatasetError if missing / no images
        log.info(
            f"data: {len(base)} images in {len(base.classes)} folders under "
            f"{portable_path(str(d.path))}"
        )
        return base

    def make_root():
        return pretrain_root(d.world, d.synthetic_n, d.synthetic_size, d.synthetic_seed)

    if env.is_main:
        root = make_root()  # generated once, cached; other ranks wait and reuse it
    barrier()
    if not env.is_main:
        root = make_root()
    base = ImageFolderDataset(root)
    log.info(
        f"no --data given: training on {len(base)} images of the {d.world} world at "
        f"{d.synthetic_size}x{d.synthetic_size} px (data.world; cached in "
        f"{portable_path(str(root))}); pass --data /path/to/imagenet/train for real pretraining"
    )
    return base


def build_dataset(
    cfg: PretrainConfig, base: ImageFolderDataset, env: DistEnv, log: RunLogger
) -> Dataset:
    """The pretraining dataset: seeded multi-crop views of ``base`` (or, with the crops on the
    device, its decoded images and the views' parameters)."""
    d = cfg.data
    if augment_on_for(d, env.device) == "device":  # workers decode + draw; crops on the device
        log.info(
            f"augmentation: crops batched on {env.device} (data.augment_on={d.augment_on}), "
            f"decoded {'on the device' if d.decode_on == 'device' else 'by the loader workers'}"
        )
        return SeededDecode(
            base,
            cfg.aug,
            cfg.run.seed,
            draft=d.decode_draft,
            max_side=d.decode_max_side,
            encoded=d.decode_on == "device",
        )
    return SeededMultiCrop(base, MultiCropAugmentation(cfg.aug), cfg.run.seed, d.on_error)


def build_monitor(
    cfg: PretrainConfig, env: DistEnv, log: RunLogger, base: ImageFolderDataset
) -> KNNMonitor | None:
    """The online k-NN monitor (``monitor.py``); every process leaves its held-out queries out
    of ``base``, the main process alone decodes and evaluates."""
    if cfg.monitor.knn_every == 0:
        return None
    held = holdout_split(cfg, base)
    if held is not None:
        base.restrict(held[1])
        log.info(
            f"k-NN monitor: {len(held[0])} images held out of pretraining as queries "
            f"(monitor.knn_holdout; {len(base)} left to train on)"
        )
    if not env.is_main:
        barrier()
        return None
    sets = monitor_sets(cfg, base, held)
    barrier()
    if sets is None:
        log.info(
            "k-NN monitor: skipped (fewer than two class folders, or too few images to hold "
            "out; monitor.knn_root=DIR names a labelled folder to use instead)"
        )
        return None
    monitor = KNNMonitor(sets, cfg, env.device)
    log.info(f"{monitor.describe()}; decoded in {monitor.decode_s:.1f}s")
    return monitor


def build_loader(dataset: Dataset, cfg: PretrainConfig, env: DistEnv):
    sampler = EpochSampler(len(dataset), env.world_size, env.rank, cfg.run.seed)
    batch = cfg.data.batch_size_per_gpu
    niter_per_ep = sampler.num_samples // batch
    if niter_per_ep == 0:
        raise ValueError(
            f"data: {len(dataset)} images give {sampler.num_samples} per process, fewer than "
            f"data.batch_size_per_gpu={batch}; lower the batch or add images"
        )
    workers = cfg.data.num_workers
    loader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch,
        num_workers=workers,
        collate_fn=(
            functools.partial(collate_decoded, cfg=cfg.aug)
            if isinstance(dataset, SeededDecode)
            else None
        ),
        pin_memory=cfg.data.pin_memory and env.device.type == "cuda",
        drop_last=True,  # as main_dino.py
        persistent_workers=workers > 0,
    )
    return loader, sampler, niter_per_ep


# ---------------------------------------------------------------------------------------------
# Model, precision
# ---------------------------------------------------------------------------------------------


def build_student_teacher(cfg: PretrainConfig) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student = backbone + DINO head; teacher = an exact copy (official: the teacher is loaded
    with the student's weights), without gradients."""
    m, d = cfg.model, cfg.dino
    backbone = build_model(
        m.arch,
        m.variant,
        seed=cfg.run.seed,
        patch_size=m.patch_size,
        img_size=cfg.aug.global_size,
        depth=m.depth,
        alpha=m.alpha,
        beta=m.beta,
        c=m.c,
    )
    head = DINOHead(
        backbone.embed_dim,
        d.out_dim,
        use_bn=d.use_bn_in_head,
        norm_last_layer=d.norm_last_layer,
        nlayers=d.head_nlayers,
        hidden_dim=d.head_hidden_dim,
        bottleneck_dim=d.head_bottleneck_dim,
    )
    student = MultiCropWrapper(backbone, head)
    teacher = copy.deepcopy(student)  # keeps backbone.spec
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def effective_precision(precision: str, device: torch.device) -> str:
    """Autocast runs on CUDA only; CPU training is fp32 (fast and exact for tests)."""
    return precision if device.type == "cuda" else "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str):
    """Loss scaling for fp16 only; for fp32/bf16 a disabled scaler, whose ``scale``,
    ``unscale_``, ``step`` and ``update`` pass through, so every precision takes one path."""
    enabled = precision == "fp16"
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # pragma: no cover - torch < 2.3


def oom_message(batch: int, device: torch.device) -> str:
    """Suggest a per-GPU batch from the memory in use when the allocation failed."""
    if device.type != "cuda":
        return (
            f"out of memory with data.batch_size_per_gpu={batch} on {device}. Try "
            f"data.batch_size_per_gpu={max(1, batch // 2)} or reduce aug.n_local."
        )
    total = torch.cuda.get_device_properties(device).total_memory
    peak = max(torch.cuda.max_memory_allocated(device), 1)
    estimate = int(batch * 0.9 * total / peak)  # peak < need: the estimate is an upper bound
    suggestion = max(1, min(batch // 2, estimate))
    return (
        f"CUDA out of memory with data.batch_size_per_gpu={batch} (peak {peak / 2**30:.1f} "
        f"of {total / 2**30:.1f} GiB). Try data.batch_size_per_gpu={suggestion} (halve again if "
        "it still fails) and scale the number of GPUs to keep the total batch, or reduce "
        "aug.n_local / use precision=bf16."
    )


def run_meta(cfg: PretrainConfig, teacher: MultiCropWrapper, niter: int, env: DistEnv) -> dict:
    spec = teacher.backbone.spec
    return {
        "backbone": spec.to_dict(),
        "arch": spec.arch,
        "variant": spec.variant,
        "optimizer": cfg.optim.optimizer,
        "patch_size": spec.patch_size,
        "depth": spec.depth,
        "embed_dim": spec.embed_dim,
        "out_dim": cfg.dino.out_dim,
        "norm_last_layer": cfg.dino.norm_last_layer,
        "use_bn_in_head": cfg.dino.use_bn_in_head,
        "n_crops": cfg.n_crops,
        "niter_per_ep": niter,
        "world_size": env.world_size,
        "total_batch": cfg.data.batch_size_per_gpu * env.world_size,
        "format_version": FORMAT_VERSION,
    }


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def condition_numbers(r: RunState, epoch: int) -> None:
    """Paper App. A.7: kappa of each self-attention map of the teacher backbone."""
    records = layer_condition_numbers(r.teacher.backbone, n_tokens=r.cfg.run.jacobian_tokens)
    r.log.append("jacobian.jsonl", [{"epoch": epoch, "step": r.step, **x} for x in records])


def _grad_norm(model: nn.Module, norms: torch.Tensor | None) -> float:
    if norms is None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms = torch.stack([g.norm(2) for g in grads]) if grads else torch.zeros(0)
    return float(norms.float().norm(2)) if norms.numel() else 0.0


def _max_steps_reached(cfg: PretrainConfig, step: int) -> bool:
    return cfg.run.max_steps is not None and step >= cfg.run.max_steps


def check_collapse(r: RunState, it: int, ent: tuple[float, float]) -> None:
    """Feed the collapse alarm with step ``it``'s teacher entropies (the mean over ranks, so
    every rank takes the same decision); warn loudly once per collapsed stretch, or stop."""
    if r.cfg.run.collapse_window <= 0:
        return
    if not r.collapse.update(it, *ent):
        return
    msg = r.collapse.message(it, *ent, r.cfg.dino.out_dim)
    if r.cfg.run.on_collapse == "stop":
        msg += f" Stopping (run.on_collapse=stop). {_on_disk(r)}."
        raise CollapseError(msg)
    r.log.warn(msg + " (run.on_collapse=stop makes this an error)")


@dataclass
class _Pending:
    """What the steps since the last logging step left on the device, read back in one go."""

    its: list[int] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)  # (loss, H(q), H(mean q)) per step
    images: list[tuple] = field(default_factory=list)  # several processes: bad-image counts

    def add(self, it: int, loss: torch.Tensor, entropies: torch.Tensor) -> None:
        self.its.append(it)
        self.values.append(torch.cat([loss.detach().float().view(1), entropies.float()]))


def _count_bad_images(
    r: RunState, status: torch.Tensor, problems: list[str], it: int, pending: _Pending
) -> None:
    """data.on_error in the main process: stop on an unusable image, count replacements.

    ``status`` is the loader's host tensor. One process acts at once, before training on the
    batch; several sum their counts at the next logging step (no per-step collective that
    would wait for the device), where every process stops at the same step."""
    codes = status.numpy()
    entry = (it, int((codes == REPLACED).sum()), int((codes == UNUSABLE).sum()), problems, codes)
    if r.env.distributed:
        pending.images.append(entry)
    else:
        _bad_images(r, *entry)


def _bad_images(r: RunState, it: int, replaced: int, unusable: int, problems, codes) -> None:
    """Act on step ``it``'s counts (all processes'), ``problems``/``codes`` this process's."""
    if not replaced and not unusable:
        return
    d = r.cfg.data
    root = getattr(r.loader.dataset.base, "root", d.path)
    if unusable:
        mine = [p for p, c in zip(problems, codes) if c == UNUSABLE]
        problem = mine[0] if mine else f"step {it}: an unreadable image on another process"
        raise DatasetError(unusable_message(problem, d.on_error, root))
    for p, c in zip(problems, codes):
        if c == REPLACED:
            r.log.warn(f"step {it}: {p} (data.on_error=skip)")
    r.bad_images["total"] += replaced
    r.bad_images["epoch"] += replaced
    samples = r.niter_per_ep * d.batch_size_per_gpu * r.env.world_size
    if r.bad_images["epoch"] > d.max_bad_fraction * samples:
        epoch = it // r.niter_per_ep
        raise DatasetError(
            too_many_message(r.bad_images["epoch"], samples, epoch, d.max_bad_fraction, root)
        )


def _flush(r: RunState, pending: _Pending) -> tuple[float, float, float] | None:
    """Read the pending steps back: the run's one wait for the device, on logging steps.

    Values are all-reduced over processes (the logged loss and the collapse monitor's entropies
    are all-rank means), then each step is accounted in order: a non-finite loss stops the run
    naming its step, the losses are recorded, the collapse alarm is fed. Returns the last
    step's (loss, H(q), H(mean q))."""
    if pending.images:  # several processes: bad images first, as a step would have seen them
        counts = torch.tensor([e[1:3] for e in pending.images], device=r.env.device).double()
        counts = (all_reduce_mean(counts) * r.env.world_size).round().long().tolist()
        entries, pending.images = pending.images, []
        for (it, _, _, problems, codes), (replaced, unusable) in zip(entries, counts):
            _bad_images(r, it, replaced, unusable, problems, codes)
    if not pending.its:
        return None
    rows = all_reduce_mean(torch.stack(pending.values)).tolist()
    its, pending.its, pending.values = pending.its, [], []
    for it, (loss, h, hb) in zip(its, rows):
        if not math.isfinite(loss):  # run.on_nonfinite=stop: skip decided at the step itself
            _skip_nonfinite_step(r, loss, None, it // r.niter_per_ep, it % r.niter_per_ep)
        r.losses.append(loss)
        r.epoch_loss["sum"] += loss
        r.epoch_loss["count"] += 1
        check_collapse(r, it, (h, hb))
    return rows[-1]


def _on_disk(r: RunState) -> str:
    """What a stopped run leaves to resume from."""
    if r.saved_step is None:
        return (
            f"No checkpoint was written yet (run.ckpt_every_steps={r.cfg.run.ckpt_every_steps}; "
            "0 saves at epoch ends only), so there is nothing to resume"
        )
    return (
        f"The last checkpoint {r.out_dir / CHECKPOINT} (step {r.saved_step}) is left unchanged; "
        "--resume continues from it"
    )


def _skip_nonfinite_step(
    r: RunState, loss_value: float, center_before: torch.Tensor | None, epoch: int, i: int
) -> None:
    """A NaN/inf loss: stop, naming the step and what is on disk, or (run.on_nonfinite=skip)
    undo the loss's centre update, count the step and drop its gradients."""
    it = epoch * r.niter_per_ep + i
    if r.cfg.run.on_nonfinite == "stop":
        raise NonFiniteLossError(
            f"loss is {loss_value} at step {it} (epoch {epoch}, iteration {i}); "
            f"stopping. {_on_disk(r)}. Lower optim.lr, check the data, or set "
            "run.on_nonfinite=skip to skip such steps."
        )
    r.loss_fn.center.copy_(center_before)  # the NaN batch must not poison it
    r.nonfinite_skipped += 1
    r.log.warn(f"non-finite loss at step {it}: step skipped ({r.nonfinite_skipped})")
    r.optimizer.zero_grad(set_to_none=True)


def _optimizer_step(r: RunState, loss: torch.Tensor, epoch: int) -> torch.Tensor | None:
    """Backward, clipping, last-layer freeze, optimizer step; returns the per-parameter
    gradient norms when clipping computed them (else None)."""
    cfg = r.cfg
    r.optimizer.zero_grad(set_to_none=True)
    # the scaler is a pass-through unless fp16 (see make_grad_scaler)
    norms = None
    r.scaler.scale(loss).backward()
    if cfg.optim.clip_grad:
        r.scaler.unscale_(r.optimizer)  # clip the true gradients
        norms = clip_gradients(r.student, cfg.optim.clip_grad)
    cancel_gradients_last_layer(epoch, r.student, cfg.optim.freeze_last_layer)
    r.scaler.step(r.optimizer)
    r.scaler.update()
    return norms


def _log_step(
    r: RunState,
    bar,
    it: int,
    epoch: int,
    loss_value: float,
    sched: dict,
    norms: torch.Tensor | None,
    img_s: float,
    ent: tuple[float, float],
) -> None:
    """One ``log.jsonl`` record (fields in the README) and the progress bar's postfix."""
    record = {
        "step": it,
        "epoch": epoch,
        "loss": loss_value,
        "lr": sched["lr"],
        "wd": sched["wd"],
        "momentum": sched["momentum"],
        "teacher_temp": r.loss_fn.teacher_temp_at(epoch),
        "grad_norm": _grad_norm(r.student, norms),
        "teacher_entropy": ent[0],
        "teacher_batch_entropy": ent[1],
        "teacher_info": ent[1] - ent[0],
        "collapsed": r.collapse.collapsed,
        "img_per_s": img_s,
        "mem_gb": memory_gb(r.env.device),
        "nonfinite_skipped": r.nonfinite_skipped,
        "bad_images_skipped": r.bad_images["total"],
    }
    r.log.log(record)
    postfix = {"loss": f"{loss_value:.4f}", "lr": f"{sched['lr']:.2e}", "img_s": f"{img_s:.1f}"}
    if r.knn_last is not None:
        postfix["knn"] = f"{r.knn_last:.1f}"
    if r.collapse.collapsed:
        postfix["COLLAPSED"] = f"since {r.collapse.streak_start}"
    bar.set_postfix(postfix)


def _teacher_forward(teacher: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
    """The teacher's call as a function of its own: compiled, it gets its own code object and
    cache, where compiling the teacher module beside the student module made the two share
    ``MultiCropWrapper.forward``'s and recompile it for the teacher."""
    return teacher(crops)


def _koleo(cfg: PretrainConfig) -> tuple[float, str]:
    return cfg.dino.koleo_weight, cfg.dino.koleo_features


def _student_loss(
    student: nn.Module,
    loss_fn: DINOLoss,
    koleo: tuple[float, str],
    crops: list[torch.Tensor],
    teacher_out: torch.Tensor,
    epoch: int,
    teacher_temp: torch.Tensor | None = None,
) -> torch.Tensor:
    """The student forward and the DINO loss (+ ``dino.koleo_weight`` x DINOv2's KoLeo term on
    the student's ``dino.koleo_features`` of each global view; ``koleo`` = (weight, features))."""
    temp = {} if teacher_temp is None else {"teacher_temp": teacher_temp}  # eager: the epoch's
    weight, features = koleo
    if not weight:
        return loss_fn(student(crops), teacher_out, epoch, **temp)
    student_out, feats = student(crops, return_features=features)
    g = len(crops[0])
    loss = loss_fn(student_out, teacher_out, epoch, **temp)
    return loss + weight * (koleo_loss(feats[:g]) + koleo_loss(feats[g : 2 * g]))


def _forward_and_loss(
    student: nn.Module,
    teacher: nn.Module,
    loss_fn: DINOLoss,
    koleo: tuple[float, str],
    crops: list[torch.Tensor],
    teacher_temp: torch.Tensor,
) -> torch.Tensor:
    """Teacher and student forwards and the DINO loss: one graph with ``run.compile_step``
    (the temperature a tensor, so a new epoch's value does not recompile it)."""
    with torch.no_grad():
        teacher_out = teacher(crops[:2])
    return _student_loss(student, loss_fn, koleo, crops, teacher_out, 0, teacher_temp)


def _device_crops(r: RunState, batch) -> list[torch.Tensor]:
    """The step's crops on the device: the device path's batched augmentation, or the CPU
    path's crops copied (non-blocking: the loader pins them)."""
    if isinstance(batch, dict):
        return device_multicrop(batch, r.cfg.aug, r.env.device)
    return [c.to(r.env.device, non_blocking=True) for c in batch]


def train_one_epoch(r: RunState, epoch: int) -> bool:
    """One epoch from ``r.step``; returns False when ``run.max_steps`` stopped the run."""
    cfg, env, dev = r.cfg, r.env, r.env.device
    start_i = r.step - epoch * r.niter_per_ep  # > 0 only right after a mid-epoch resume
    if start_i == 0:
        r.bad_images["epoch"] = 0
        r.epoch_loss = {"sum": 0.0, "count": 0}
    r.sampler.set_epoch(epoch, skip=start_i * cfg.data.batch_size_per_gpu)
    total_batch = cfg.data.batch_size_per_gpu * env.world_size
    bar = progress_bar(
        r.niter_per_ep,
        start_i,
        f"epoch {epoch + 1}/{cfg.optim.epochs}",
        env.is_main and cfg.run.progress,
    )
    pending = _Pending()
    teacher_temp = torch.full((), r.loss_fn.teacher_temp_at(epoch), device=dev)  # compile_step
    t_window, n_window = time.perf_counter(), 0
    for i, batch in enumerate(r.loader, start=start_i):
        it = epoch * r.niter_per_ep + i  # global training iteration
        try:
            # the CPU path yields (crops, decode status, problems); the device path a dict
            if not isinstance(batch, dict):
                batch, status, problems = batch
                _count_bad_images(r, status, problems, it, pending)
            sched = r.schedules.at(it)
            apply_schedules_(r.optimizer, sched["lr"], sched["wd"])
            crops = _device_crops(r, batch)

            # --- forward: teacher on the 2 global crops, student on all crops ----------------
            center_before = r.loss_fn.center.clone() if cfg.run.on_nonfinite == "skip" else None
            with autocast(r.precision, dev):
                if r.forward_loss is not None:
                    loss = r.forward_loss(crops, teacher_temp)
                else:
                    with torch.no_grad():
                        teacher_out = r.teacher_fwd(crops[:2])
                    loss = _student_loss(
                        r.student_fwd, r.loss_fn, _koleo(cfg), crops, teacher_out, epoch
                    )
            if cfg.run.on_nonfinite == "skip":  # decided before the update: waits every step
                loss_value = all_reduce_mean(loss.detach()).item()
                if not math.isfinite(loss_value):
                    _skip_nonfinite_step(r, loss_value, center_before, epoch, i)
                    r.step = it + 1
                    bar.update(1)
                    continue

            # --- backward, clipping, last-layer freeze, optimizer step; EMA teacher ----------
            norms = _optimizer_step(r, loss, epoch)
            ema_update_(r.teacher, r.student, sched["momentum"])
            pending.add(it, loss, r.loss_fn.last_entropies)
            r.step = it + 1
            n_window += 1
            bar.update(1)

            # --- logging, checkpoint: the only steps that wait for the device ----------------
            log_now = r.step % cfg.run.log_every == 0 or i == r.niter_per_ep - 1
            save_now = cfg.run.ckpt_every_steps and r.step % cfg.run.ckpt_every_steps == 0
            stop_now = _max_steps_reached(cfg, r.step) and i < r.niter_per_ep - 1
            if log_now or save_now or stop_now:
                last = _flush(r, pending)
            if log_now:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                dt = time.perf_counter() - t_window
                img_s = total_batch * n_window / max(dt, 1e-9)
                _log_step(r, bar, it, epoch, last[0], sched, norms, img_s, tuple(last[1:]))
                t_window, n_window = time.perf_counter(), 0
        except torch.cuda.OutOfMemoryError:
            raise PretrainOOMError(oom_message(cfg.data.batch_size_per_gpu, dev)) from None

        if save_now:
            save_checkpoint(r, r.out_dir / CHECKPOINT)
        if stop_now:
            bar.close()
            return False  # mid-epoch stop; at an epoch's end ``train`` finishes the epoch first
    _flush(r, pending)  # nothing is left unless the loader ended early
    bar.close()
    return True


def _run_epoch(r: RunState, epoch: int) -> bool:
    """``train_one_epoch``; the error that stops the run also goes to DIR/log.txt."""
    try:
        return train_one_epoch(r, epoch)
    except (NonFiniteLossError, PretrainOOMError, DatasetError, CollapseError) as e:
        r.log.error(str(e))
        raise


# ---------------------------------------------------------------------------------------------
# train(): its phases
# ---------------------------------------------------------------------------------------------


def open_run_dir(cfg: PretrainConfig, env: DistEnv, out_dir: Path, resume_run: bool) -> RunLogger:
    """Refuse a fresh start over a checkpoint, clean what a killed run left, open the log."""
    if not resume_run and (out_dir / CHECKPOINT).exists():
        raise FileExistsError(
            f"{out_dir / CHECKPOINT} exists: pass --resume to continue that run, or another --out"
        )
    if not resume_run and (out_dir / "backbone.pt").exists():  # e.g. a supervised export
        raise FileExistsError(
            f"{out_dir / 'backbone.pt'} exists (an earlier export, with no checkpoint to resume): "
            "choose another --out"
        )
    # A killed run leaves temp files of its atomic writes, and, if killed before its first
    # checkpoint, logs that a fresh start must not append to.
    stale = remove_stale_temp_files(out_dir) if env.is_main else []
    rotated = rotate_logs(out_dir) if env.is_main and not resume_run else None
    log = RunLogger(out_dir, enabled=env.is_main, tensorboard=cfg.run.tensorboard)
    if stale:
        names = ", ".join(p.name for p in stale[:3]) + (", ..." if len(stale) > 3 else "")
        log.info(f"removed {len(stale)} temp file(s) left by an interrupted save: {names}")
    if rotated:
        log.info(f"{out_dir} held the logs of a run that left no checkpoint: moved to {rotated}")
    return log


def set_up_torch(cfg: PretrainConfig, dev: torch.device) -> None:
    """Threads, TF32, and the global seeds (official utils.fix_random_seeds; the model init is
    seeded separately in build_model)."""
    if dev.type == "cpu" and cfg.run.cpu_threads:
        torch.set_num_threads(cfg.run.cpu_threads)
    if dev.type == "cuda" and cfg.run.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)


def _forward_modules(
    student: MultiCropWrapper,
    teacher: MultiCropWrapper,
    loss_fn: DINOLoss,
    cfg: PretrainConfig,
    env: DistEnv,
) -> tuple[nn.Module, nn.Module, object]:
    """The callables the step uses: the student (in DDP with several processes) and teacher
    forwards, compiled apart with ``run.compile``; with ``run.compile_step`` one compiled
    forward-and-loss (else None).

    DDP: gradients are views into the all-reduce buckets (no copy per step), and the graph is
    static (every step uses the same parameters: the frozen last layer's gradients are dropped
    after the backward, not skipped), so DDP can overlap and reuse its bucket plan."""
    dev = env.device
    student_fwd: nn.Module = student
    if env.distributed:
        student_fwd = nn.parallel.DistributedDataParallel(
            student,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            gradient_as_bucket_view=True,
            static_graph=True,
        )
    teacher_fwd = teacher  # no BatchNorm: the teacher needs no DDP wrapper
    compile = functools.partial(torch.compile, backend=cfg.run.compile_backend)
    if cfg.run.compile_step:
        step = compile(_forward_and_loss)
        return (
            student_fwd,
            teacher_fwd,
            functools.partial(step, student_fwd, teacher, loss_fn, _koleo(cfg)),
        )
    if cfg.run.compile:
        student_fwd = compile(student_fwd)
        teacher_fwd = functools.partial(compile(_teacher_forward), teacher)
    return student_fwd, teacher_fwd, None


def build_loss(cfg: PretrainConfig) -> DINOLoss:
    d = cfg.dino
    return DINOLoss(
        d.out_dim,
        cfg.n_crops,
        warmup_teacher_temp=d.warmup_teacher_temp,
        teacher_temp=d.teacher_temp,
        warmup_teacher_temp_epochs=d.warmup_teacher_temp_epochs,
        n_epochs=cfg.optim.epochs,
        student_temp=d.student_temp,
        center_momentum=d.center_momentum,
        centering=d.centering,
        sk_iterations=d.sk_iterations,
    )


def _schedules(cfg: PretrainConfig, niter_per_ep: int, total_batch: int):
    o = cfg.optim
    return build_schedules(
        lr=o.lr,
        min_lr=o.min_lr,
        warmup_epochs=o.warmup_epochs,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=cfg.dino.momentum_teacher,
        epochs=o.epochs,
        niter_per_ep=niter_per_ep,
        total_batch=total_batch,
    )


def _log_start(r: RunState) -> None:
    cfg, o, env = r.cfg, r.cfg.optim, r.env
    total_batch = cfg.data.batch_size_per_gpu * env.world_size
    n_params = sum(p.numel() for p in r.student.parameters())
    r.log.info(
        f"DINO pretraining: {cfg.model.arch}/{cfg.model.patch_size} variant={cfg.model.variant} "
        f"depth={r.teacher.backbone.spec.depth} optimizer={o.optimizer} | {n_params / 1e6:.2f}M "
        f"student params | device={env.device} x{env.world_size} precision={r.precision} | total "
        f"batch {total_batch} ({cfg.data.batch_size_per_gpu}/process), {cfg.n_crops} crops "
        f"({cfg.aug.global_size}px/{cfg.aug.local_size}px) | lr {scaled_lr(o.lr, total_batch):.3g} "
        f"(= {o.lr} x {total_batch}/256) | {o.epochs} epochs x {r.niter_per_ep} it | out "
        f"{r.out_dir}"
    )


def _train_epochs(r: RunState) -> bool:
    """Epochs from the (resumed) step to ``optim.epochs``, each ended by a checkpoint and
    export; returns False when ``run.max_steps`` stopped the run."""
    cfg, out_dir = r.cfg, r.out_dir
    r.start_clock()
    for epoch in range(r.step // r.niter_per_ep, cfg.optim.epochs):
        finished = _run_epoch(r, epoch)
        # every epoch, as main_dino.py, and where run.max_steps stops mid-epoch
        save_checkpoint(r, out_dir / CHECKPOINT)
        if r.env.is_main:
            export_backbone(r.teacher.backbone, out_dir)
        if not finished:  # run.max_steps, mid-epoch
            _log_stop(r)
            return False
        done = epoch + 1
        if r.env.is_main:
            _epoch_extras(r, done)
        mean_loss = r.epoch_loss["sum"] / max(r.epoch_loss["count"], 1)
        r.log.info(
            f"epoch {done}/{cfg.optim.epochs}: mean loss {mean_loss:.4f} (step {r.step}, "
            f"{r.elapsed():.0f}s)"
        )
        if _max_steps_reached(cfg, r.step) and done < cfg.optim.epochs:
            _log_stop(r)
            return False
    return True


def _log_stop(r: RunState) -> None:
    r.log.info(f"stopped at step {r.step} (run.max_steps); checkpoint {r.out_dir / CHECKPOINT}")


def _epoch_extras(r: RunState, done: int) -> None:
    """Main process, after epoch ``done``: the kept snapshots and the condition numbers."""
    run = r.cfg.run
    if (run.saveckp_freq and done % run.saveckp_freq == 0) or done in run.keep_epochs:
        save_checkpoint(r, r.out_dir / f"checkpoint_epoch{done:04d}.pt")
        export_backbone(r.teacher.backbone, r.out_dir, f"backbone_epoch{done:04d}")
    if run.jacobian_every_epochs and done % run.jacobian_every_epochs == 0:
        condition_numbers(r, done)
    every = r.cfg.monitor.knn_every
    if every and (done % every == 0 or done == r.cfg.optim.epochs):
        knn_monitor(r, done)


def calibrate_teacher_temp(r: RunState) -> None:
    """``dino.teacher_temp_min_info`` (``calibrate.py``): scale the teacher temperatures so the
    initial target carries that much information, measured on the first batches of epoch 0.
    Every RNG is restored afterwards, so the run's data and crops are unchanged."""
    cfg, dev = r.cfg, r.env.device
    min_info = cfg.dino.teacher_temp_min_info
    if min_info is None:
        return
    saved = rng_state()
    batch = cfg.data.batch_size_per_gpu
    ds = r.loader.dataset
    order = r.sampler.indices()[: N_BATCHES * batch]
    logits = []
    try:
        with torch.no_grad(), autocast(r.precision, dev):
            for i in range(0, len(order) - batch + 1, batch):
                items = [ds[(0, j)] for j in order[i : i + batch]]
                if isinstance(ds, SeededDecode):
                    crops = device_multicrop(collate_decoded(items), cfg.aug, dev)
                else:
                    crops = [c.to(dev) for c in default_collate([it[0] for it in items])]
                logits.append(r.teacher_fwd(crops[:2]).float())
    finally:
        set_rng_state(saved)
    temp = r.loss_fn.teacher_temp_at(0)
    curve = torch.tensor(information_curve(logits, temp, cfg.dino.centering,
                                           cfg.dino.sk_iterations), device=dev)  # fmt: skip
    curve = all_reduce_mean(curve).cpu().tolist()  # every process takes the same factor
    factor, before, after = pick_scale(curve, min_info)
    apply_scale(r.loss_fn, factor)
    if factor == 1.0:
        r.log.info(
            f"teacher temperature kept: the initial target carries {before:.2f} nats about the "
            f"image at T={temp:g} (>= dino.teacher_temp_min_info={min_info})"
        )
    else:
        r.log.info(
            f"teacher temperature calibrated: the initial target carried {before:.2f} nats about "
            f"the image at T={temp:g} (< dino.teacher_temp_min_info={min_info}); both "
            f"temperatures scaled by {factor:.3f} (T={temp * factor:.4g} at step 0, "
            f"{r.loss_fn.teacher_temp_schedule[-1]:.4g} at the end): {after:.2f} nats"
        )


def knn_monitor(r: RunState, epoch: int) -> None:
    """Main process: one k-NN evaluation of the teacher backbone (``monitor.py``), to
    ``knn.jsonl``, the log and the progress bar."""
    if r.monitor is None:
        return
    rec = r.monitor.evaluate(r.teacher.backbone)
    r.knn_last = rec["knn_top1"]
    r.log.append(KNN_LOG, [{"epoch": epoch, "step": r.step, **rec}])
    init = read_jsonl(r.out_dir / KNN_LOG)[0]
    vs = "" if epoch == 0 else f" (init {init['knn_top1']:.2f})"
    r.log.info(
        f"k-NN monitor, epoch {epoch}: top-1 {rec['knn_top1']:.2f}{vs} on {rec['knn_n_query']} "
        f"held-out images ({rec['knn_time_s']:.1f}s)"
    )


def monitor_verdict(out_dir: Path, collapse: CollapseMonitor) -> dict | None:
    """The last k-NN evaluation of ``knn.jsonl`` paired with the first (the init); a run that
    sits collapsed at its end did not learn."""
    records = read_jsonl(out_dir / KNN_LOG)
    if len(records) < 2 or records[0]["step"] != 0:
        return None
    since = collapse.streak_start if collapse.collapsed else None
    return learned_verdict(records[0], records[-1], since) | {"step": records[-1]["step"]}


def _report_end(r: RunState, finished: bool) -> None:
    """Main process: ``summary.json``, the collapse verdict, and last, whether it learned."""
    out_dir = r.out_dir
    verdict = monitor_verdict(out_dir, r.collapse) if r.monitor is not None else None
    summary = {
        "final_loss": r.losses[-1] if r.losses else None,
        "step": r.step,
        "epoch": r.step // r.niter_per_ep,
        "finished": finished,
        "time_s": r.elapsed(),
        "nonfinite_skipped": r.nonfinite_skipped,
        "collapse": r.collapse.summary(),
        "bad_images_skipped": r.bad_images["total"],
        "knn_monitor": verdict,
        "teacher_temp_scale": r.loss_fn.teacher_temp_scale,
        "backbone": str(out_dir / "backbone.pt"),
    }
    write_json(out_dir / "summary.json", summary)
    if finished:
        r.log.info(f"done: teacher backbone exported to {out_dir / 'backbone.pt'} (+ .json)")
    c = r.collapse
    if c.collapsed_at >= 0:
        now = "and still is at the end" if c.collapsed else "and recovered later"
        r.log.warn(
            f"THIS RUN COLLAPSED: the teacher target stopped depending on the image at step "
            f"{c.collapsed_at} ({c.collapsed_steps} steps collapsed in all) {now}; its "
            f"features are unlikely to beat a random init. Try {ADVICE}."
        )
    if verdict is not None:
        line = verdict_line(verdict)
        (r.log.info if verdict["learned"] else r.log.warn)(line)


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------


def train(cfg: PretrainConfig, resume_run: bool = False) -> TrainResult:
    """Pretrain with DINO as ``cfg`` says; writes into ``cfg.out_dir()`` (see module doc),
    which it holds for the whole run (``dino_skipless.outdir``: one run per folder)."""
    cfg.validate()
    if cfg.data.path and not Path(cfg.data.path).is_dir():  # before the folder is touched
        raise DatasetError(f"data.path {cfg.data.path}: no such folder (an ImageFolder root)")
    rank0 = int(os.environ.get("RANK", "0")) == 0  # only rank 0 writes (and locks)
    with claim_out_dir(cfg.out_dir(), STAGE, report=None, enabled=rank0):
        return _train(cfg, resume_run)


def _train(cfg: PretrainConfig, resume_run: bool) -> TrainResult:
    env = init_distributed(cfg.run.device, cfg.run.dist_timeout_s)
    if env.distributed and cfg.run.compile_step:
        raise ConfigError(
            f"run.compile_step=true with {env.world_size} processes is not supported (the DINO "
            "centre's all-reduce stays outside compiled graphs); use run.compile=true, which "
            "compiles the student and teacher forwards"
        )
    if augment_on_for(cfg.data, env.device) == "device" and cfg.data.on_error != "raise":
        raise ConfigError(
            f"data.augment_on={cfg.data.augment_on} puts the crops on {env.device}, where "
            "data.on_error=skip is not supported yet; use data.augment_on=cpu to skip bad images"
        )
    if env.distributed and cfg.dino.use_bn_in_head:
        raise ConfigError(
            f"dino.use_bn_in_head=true with {env.world_size} processes is not supported: the "
            "official code syncs the head's BatchNorm across GPUs (SyncBatchNorm, teacher in "
            "DDP), this trainer does not; use dino.use_bn_in_head=false (DINO's default) or "
            "one process"
        )
    out_dir = cfg.out_dir()
    log = open_run_dir(cfg, env, out_dir, resume_run)
    dev = env.device
    set_up_torch(cfg, dev)

    # ============ data (and the k-NN monitor's held-out images) ============
    base = build_base_dataset(cfg, env, log)
    monitor = build_monitor(cfg, env, log, base)
    loader, sampler, niter_per_ep = build_loader(build_dataset(cfg, base, env, log), cfg, env)

    # ============ student and teacher ============
    student, teacher = build_student_teacher(cfg)
    student.to(dev)
    teacher.to(dev)
    loss_fn = build_loss(cfg).to(dev)
    student_fwd, teacher_fwd, forward_loss = _forward_modules(student, teacher, loss_fn, cfg, env)

    # ============ loss, optimizer, schedules ============
    o = cfg.optim
    optimizer = build_optimizer(o.optimizer, get_param_groups(student), adamw=o.adamw, soap=o.soap)
    precision = effective_precision(cfg.run.precision, dev)
    schedules = _schedules(cfg, niter_per_ep, cfg.data.batch_size_per_gpu * env.world_size)
    r = RunState(
        cfg=cfg,
        env=env,
        log=log,
        loader=loader,
        sampler=sampler,
        niter_per_ep=niter_per_ep,
        student=student,
        teacher=teacher,
        student_fwd=student_fwd,
        teacher_fwd=teacher_fwd,
        forward_loss=forward_loss,
        loss_fn=loss_fn,
        optimizer=optimizer,
        scaler=make_grad_scaler(precision),
        schedules=schedules,
        precision=precision,
        meta=run_meta(cfg, teacher, niter_per_ep, env),
        out_dir=out_dir,
        collapse=CollapseMonitor(cfg.run.collapse_window, cfg.run.collapse_min_info),
        monitor=monitor,
    )
    if resume_run:
        resume(r)
    else:
        calibrate_teacher_temp(r)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
        if not resume_run:
            # the run's own random init, so "does training help?" compares like with like
            export_backbone(r.teacher.backbone, out_dir / INIT_DIR)
            knn_monitor(r, 0)
    _log_start(r)

    # ============ training ============
    finished = _train_epochs(r)
    barrier()
    if env.is_main:
        _report_end(r, finished)
    log.close()
    return TrainResult(
        out_dir, r.step, r.step // niter_per_ep, r.losses[-1] if r.losses else None,
        r.nonfinite_skipped, not finished, r.losses,
        collapse=r.collapse.summary(), bad_images_skipped=r.bad_images["total"],
    )  # fmt: skip
