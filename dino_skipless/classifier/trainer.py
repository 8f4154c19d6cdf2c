"""The paper's supervised trainer (Sec. 6.1, Table 1, Fig. 1), read top to bottom.

``train(cfg)`` builds the two splits, the ViT + linear head, the optimizer (AdamW or SOAP, the
recipe's parameter groups) and the per-iteration schedules, optionally resumes, then runs the
shared supervised loop (``loop.py``) for ``optim.epochs`` epochs of
``len(train) // (batch x accum x processes)`` steps (engine.py drops the rest of an epoch). After
every epoch: the epoch's mean training loss, val top-1 / top-5 every ``eval.every_epochs``
epochs and after the last (``epochs.jsonl``), a checkpoint for an exact ``--resume`` and the
exported backbone (``backbone.pt`` + ``.json``, read by every evaluation stage).

Files in ``OUT``: ``config.yaml``, ``log.jsonl`` (one record every ``run.log_every`` steps:
``step``, ``epoch``, ``loss`` (that step's), ``loss_mean`` (since the last record), ``lr``, ``wd``,
``grad_norm``, ``img_per_s``, ``mem_gb``), ``epochs.jsonl`` (``epoch``, ``step``, ``train_loss``,
and ``top1``, ``top5``, ``val_loss`` where evaluated), ``log.txt``, ``checkpoint.pt``,
``backbone.pt`` / ``.json``, ``init/`` (the backbone before step 0) and ``summary.json``
(``final_loss``, ``step``, ``steps_per_epoch``, ``finished``, ``time_s`` / ``cpu_s`` (wall and
training-process CPU seconds, summed over resumes), ``top1`` / ``top5`` / ``val_loss`` of the last
evaluation, ``best_top1`` / ``best_epoch``, the data sizes and the ``config``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import DatasetError
from ..dino.checkpoint import (
    CHECKPOINT,
    INIT_DIR,
    ResumeError,
    atomic_torch_save,
    check_compatible,
    export_backbone,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from ..dino.distributed import DistEnv, barrier, init_distributed
from ..dino.runlog import RunLogger, truncate_jsonl
from ..dino.schedules import Schedules, cosine_scheduler
from ..dino.trainer import effective_precision, open_run_dir, set_up_torch
from ..fileio import write_json, write_yaml
from ..models import build_model
from ..optim import build_optimizer, get_param_groups
from ..outdir import claim_out_dir
from .config import ClassifyConfig, ConfigError
from .data import build_criterion, build_mixup, load_splits, mix, train_loader, val_loader
from .evaluate import evaluate
from .loop import Loop, LoopState, NonFiniteLossError, TrainStep

FORMAT_VERSION = 1
# Settings a resumed run must share with its checkpoint (shapes, optimizer state, meaning).
MUST_MATCH = ("arch", "variant", "optimizer", "patch_size", "depth", "embed_dim", "num_classes")


class ClassifyOOMError(RuntimeError):
    """CUDA ran out of memory; the message says how to keep the total batch with less memory."""


@dataclass
class ClassifyResult:
    out_dir: Path
    step: int  # optimisation steps done
    finished: bool  # False: stopped at run.max_steps
    final_loss: float | None
    top1: float | None  # the last evaluation's
    top5: float | None
    best_top1: float | None
    losses: list[float] = field(default_factory=list)  # every finite loss of this process
    epochs: list[dict] = field(default_factory=list)  # the epochs.jsonl records of this process


class Classifier(nn.Module):
    """The registry's backbone (its output: the CLS token after the final norm, timm's
    ``global_pool='token'``) and a linear head initialised as timm's ViT head
    (``init_weights_vit_timm``: truncated normal, std 0.02; zero bias)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(cfg: ClassifyConfig, num_classes: int) -> Classifier:
    m = cfg.model
    backbone = build_model(
        m.arch, m.variant, seed=cfg.run.seed, patch_size=m.patch_size, img_size=m.img_size,
        depth=m.depth, alpha=m.alpha, beta=m.beta, c=m.c,
    )  # fmt: skip
    return Classifier(backbone, num_classes)


def scaled_lr(cfg: ClassifyConfig, total_batch: int) -> float:
    """``optim.lr`` is the lr at ``optim.lr_batch`` images per step; linear in the batch."""
    return cfg.optim.lr * total_batch / cfg.optim.lr_batch


def build_schedules(cfg: ClassifyConfig, niter_per_ep: int, total_batch: int) -> Schedules:
    """utils.cosine_scheduler (the same function as DINO's): lr warms up linearly from 0 over
    ``warmup_epochs``, then cosine to ``min_lr``; weight decay cosine (constant in the recipe)."""
    o = cfg.optim
    lr = cosine_scheduler(
        scaled_lr(cfg, total_batch), o.min_lr, o.epochs, niter_per_ep, o.warmup_epochs
    )
    wd = cosine_scheduler(o.weight_decay, o.weight_decay_end, o.epochs, niter_per_ep)
    return Schedules(lr=lr, wd=wd)


def run_meta(cfg, model: Classifier, niter: int, env: DistEnv, num_classes: int) -> dict:
    spec = model.backbone.spec
    total = cfg.data.batch_size_per_gpu * cfg.data.accum_steps * env.world_size
    return {
        "backbone": spec.to_dict(),
        "arch": spec.arch,
        "variant": spec.variant,
        "optimizer": cfg.optim.optimizer,
        "patch_size": spec.patch_size,
        "depth": spec.depth,
        "embed_dim": spec.embed_dim,
        "num_classes": num_classes,
        "niter_per_ep": niter,
        "world_size": env.world_size,
        "total_batch": total,
        "format_version": FORMAT_VERSION,
    }


def oom_message(cfg: ClassifyConfig) -> str:
    b, a = cfg.data.batch_size_per_gpu, cfg.data.accum_steps
    return (
        f"CUDA out of memory with data.batch_size_per_gpu={b}. Keep the total batch (and so the "
        f"recipe) with less memory: data.batch_size_per_gpu={max(b // 2, 1)} "
        f"data.accum_steps={a * 2}"
    )


class _Run:
    """One training run's pieces and the bookkeeping the epoch-end hook and checkpoints share."""

    def __init__(self, cfg: ClassifyConfig, env: DistEnv, log: RunLogger, out_dir: Path):
        self.cfg, self.env, self.log, self.out_dir = cfg, env, log, out_dir
        self.epochs: list[dict] = []
        self.best = {"top1": None, "epoch": None}
        self.last_eval: dict | None = None
        self.elapsed_before, self.t_start = 0.0, time.monotonic()
        self.cpu_before, self.cpu_start = 0.0, time.process_time()
        self.saved_step: int | None = None

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t_start

    def cpu(self) -> float:
        """CPU seconds of the training process (all its threads, not its loader workers): on a
        shared machine a steadier measure of the work than the wall time."""
        return self.cpu_before + time.process_time() - self.cpu_start

    # --- checkpoint ------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        self.saved_step = self.state.step
        if not self.env.is_main:
            return
        scaler = self.step_fn.scaler
        atomic_torch_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "loop": self.state.state_dict(),
                "nonfinite_skipped": self.step_fn.nonfinite_skipped,
                "best": dict(self.best),
                "last_eval": self.last_eval,
                "elapsed_s": self.elapsed(),
                "cpu_s": self.cpu(),
                "rng": rng_state(),
                "config": self.cfg.to_dict(),
                "meta": self.meta,
            },
            path,
        )

    def restore(self) -> None:
        path = self.out_dir / CHECKPOINT
        ckpt = load_checkpoint(path, required=("model", "loop", "meta"))
        check_compatible(ckpt["meta"], self.meta, path, MUST_MATCH)
        if ckpt["meta"].get("niter_per_ep") != self.meta["niter_per_ep"]:
            raise ResumeError(
                f"cannot resume from {path} exactly: it had {ckpt['meta'].get('niter_per_ep')} "
                f"steps per epoch (total batch {ckpt['meta'].get('total_batch')}), this run has "
                f"{self.meta['niter_per_ep']} (total batch {self.meta['total_batch']}); use the "
                "same data, batch_size_per_gpu, accum_steps and number of processes"
            )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.step_fn.scaler.is_enabled() and ckpt.get("scaler"):
            self.step_fn.scaler.load_state_dict(ckpt["scaler"])
        self.state.load_state_dict(ckpt["loop"])
        self.step_fn.nonfinite_skipped = int(ckpt.get("nonfinite_skipped", 0))
        self.best = dict(ckpt.get("best", self.best))
        self.last_eval = ckpt.get("last_eval")
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        self.cpu_before = float(ckpt.get("cpu_s", 0.0))
        set_rng_state(ckpt["rng"])
        self.saved_step = self.state.step
        if self.env.is_main:
            dropped = truncate_jsonl(self.out_dir / "log.jsonl", self.state.step)
            # an epoch record is written before its epoch-end checkpoint: keep step <= saved
            dropped += truncate_jsonl(self.out_dir / "epochs.jsonl", self.state.step + 1)
            extra = f"; dropped {dropped} log records written after it" if dropped else ""
            self.log.info(f"resumed from {path} at step {self.state.step}{extra}")

    # --- the epoch-end hook --------------------------------------------------------------------
    def epoch_end(self, epoch: int) -> None:
        cfg = self.cfg
        record = {"epoch": epoch, "step": self.state.step, "train_loss": self.state.last_epoch_loss}
        if epoch % cfg.eval.every_epochs == 0 or epoch == cfg.optim.epochs:
            ev = evaluate(self.model, self.val, self.env.device, self.precision)
            self.last_eval = {**ev, "epoch": epoch}
            record.update(top1=ev["top1"], top5=ev["top5"], val_loss=ev["loss"], n_val=ev["n"])
            if self.best["top1"] is None or ev["top1"] > self.best["top1"]:
                self.best = {"top1": ev["top1"], "epoch": epoch}
        self.epochs.append(record)
        self.log.append("epochs.jsonl", [record])
        msg = f"epoch {epoch}/{cfg.optim.epochs}: train loss {_fmt(record['train_loss'])}"
        if "top1" in record:
            msg += f", val top-1 {record['top1']:.2f} top-5 {record['top5']:.2f}"
        self.log.info(f"{msg} (step {self.state.step}, {self.elapsed():.0f}s)")
        self.save(self.out_dir / CHECKPOINT)
        if self.env.is_main:
            export_backbone(self.model.backbone, self.out_dir)

    def step_end(self, step: int) -> None:
        every = self.cfg.run.ckpt_every_steps
        if every and step % every == 0 and step % self.niter:
            self.save(self.out_dir / CHECKPOINT)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _log_start(r: _Run, where: str, n_train: int, n_val: int, num_classes: int) -> None:
    cfg, env = r.cfg, r.env
    total = r.meta["total_batch"]
    n_params = sum(p.numel() for p in r.model.parameters())
    r.log.info(
        f"supervised training: {cfg.model.arch}/{cfg.model.patch_size} variant="
        f"{cfg.model.variant} optimizer={cfg.optim.optimizer} | {n_params / 1e6:.2f}M params | "
        f"device={env.device} x{env.world_size} precision={r.precision} | data: {where}; "
        f"{n_train} train / {n_val} val images, {num_classes} classes | total batch {total} "
        f"({cfg.data.batch_size_per_gpu}/process x {cfg.data.accum_steps} accumulated) | lr "
        f"{scaled_lr(cfg, total):.3g} (= {cfg.optim.lr} x {total}/{cfg.optim.lr_batch}) | "
        f"{cfg.optim.epochs} epochs x {r.niter} steps | out {r.out_dir}"
    )


def train(cfg: ClassifyConfig, resume_run: bool = False) -> ClassifyResult:
    """Train the classifier ``cfg`` describes, into ``cfg.out_dir()`` (module docstring), which
    it holds for the whole run (``dino_skipless.outdir``: one run per folder)."""
    cfg.validate()
    rank0 = int(os.environ.get("RANK", "0")) == 0  # only rank 0 writes (and locks)
    with claim_out_dir(cfg.out_dir(), "classify", report=None, enabled=rank0):
        return _train_in(cfg, resume_run)


def _train_in(cfg: ClassifyConfig, resume_run: bool) -> ClassifyResult:
    try:
        env = init_distributed(cfg.run.device)
    except RuntimeError as e:  # e.g. run.device=cuda on a machine without one
        raise ConfigError(f"run.device={cfg.run.device!r}: {e}") from None
    out_dir = cfg.out_dir()
    log = open_run_dir(cfg, env, out_dir, resume_run)
    dev = env.device
    set_up_torch(cfg, dev)
    r = _Run(cfg, env, log, out_dir)
    try:
        return _train(r, resume_run)
    except (NonFiniteLossError, ClassifyOOMError, DatasetError, ValueError) as e:
        log.error(str(e))
        raise
    finally:
        log.close()


def _train(r: _Run, resume_run: bool) -> ClassifyResult:
    cfg, env, dev = r.cfg, r.env, r.env.device
    # ============ data ============
    if env.is_main:
        splits = load_splits(cfg)  # generates the synthetic fallback once; others wait
    barrier()
    if not env.is_main:
        splits = load_splits(cfg)
    pin = cfg.data.pin_memory and dev.type == "cuda"
    loader, sampler = train_loader(splits.train, cfg, env.world_size, env.rank, pin)
    r.val = val_loader(splits.val, cfg, env.world_size, env.rank, pin)
    per_step = cfg.data.batch_size_per_gpu * cfg.data.accum_steps
    r.niter = sampler.num_samples // per_step
    if r.niter == 0:
        raise DatasetError(
            f"data: {len(splits.train)} training images give {sampler.num_samples} per process, "
            f"fewer than one step of data.batch_size_per_gpu x data.accum_steps = {per_step}; "
            "lower the batch or add images"
        )

    # ============ model, optimizer, schedules ============
    model = build_classifier(cfg, splits.num_classes).to(dev)
    r.model = model
    forward: nn.Module = model
    if env.distributed:
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    if cfg.run.compile:
        forward = torch.compile(forward)
    o = cfg.optim
    groups = get_param_groups(model, no_weight_decay=o.no_weight_decay)
    r.optimizer = build_optimizer(o.optimizer, groups, adamw=o.adamw, soap=o.soap)
    r.precision = effective_precision(cfg.run.precision, dev)
    r.meta = run_meta(cfg, model, r.niter, env, splits.num_classes)
    schedules = build_schedules(cfg, r.niter, r.meta["total_batch"])
    r.step_fn = TrainStep(
        model, r.optimizer, schedules, forward=forward, device=dev, precision=r.precision,
        clip_grad=o.clip_grad, on_nonfinite=cfg.run.on_nonfinite,
    )  # fmt: skip
    r.state = LoopState()
    criterion, mixup = build_criterion(cfg), build_mixup(cfg, splits.num_classes)

    def loss_fn(fwd, batch, step, k):
        x, y = (t.to(dev, non_blocking=True) for t in batch)
        x, y = mix(mixup, x, y, (cfg.run.seed, step, k, env.rank))
        return criterion(fwd(x), y), {}

    def batches(epoch: int, skip: int):
        sampler.set_epoch(epoch, skip=skip * cfg.data.batch_size_per_gpu)
        return loader

    if resume_run:
        r.restore()
    if env.is_main:
        out = r.out_dir
        out.mkdir(parents=True, exist_ok=True)
        write_yaml(out / "config.yaml", cfg.to_dict())
        if not resume_run:  # the run's own random init: the floor of "did training help?"
            export_backbone(model.backbone, out / INIT_DIR)
    _log_start(r, splits.where, len(splits.train), len(splits.val), splits.num_classes)

    # ============ training ============
    loop = Loop(
        step_fn=r.step_fn, loss_fn=loss_fn, batches=batches, accum=cfg.data.accum_steps,
        total_steps=o.epochs * r.niter, steps_per_epoch=r.niter, epoch_steps=r.niter,
        stop_at=cfg.run.max_steps, log=r.log, log_every=cfg.run.log_every,
        total_batch=r.meta["total_batch"], progress=env.is_main and cfg.run.progress,
        epochs=o.epochs, on_epoch_end=r.epoch_end, on_step_end=r.step_end,
    )  # fmt: skip
    r.t_start, r.cpu_start = time.monotonic(), time.process_time()
    model.train()
    try:
        finished = loop.run(r.state)
    except torch.cuda.OutOfMemoryError:
        raise ClassifyOOMError(oom_message(cfg)) from None
    if r.saved_step != r.state.step:  # stopped mid-epoch (run.max_steps)
        r.save(r.out_dir / CHECKPOINT)
        if env.is_main:
            export_backbone(model.backbone, r.out_dir)
        r.log.info(f"stopped at step {r.state.step} (run.max_steps); --resume continues")
    barrier()
    if env.is_main:
        _report_end(r, finished, splits)
    ev = r.last_eval or {}
    return ClassifyResult(
        r.out_dir, r.state.step, finished, r.state.losses[-1] if r.state.losses else None,
        ev.get("top1"), ev.get("top5"), r.best["top1"], r.state.losses, r.epochs,
    )  # fmt: skip


def _report_end(r: _Run, finished: bool, splits) -> None:
    ev = r.last_eval or {}
    losses = r.state.losses
    summary = {
        "final_loss": losses[-1] if losses else None,
        "step": r.state.step,
        "epoch": r.state.step // r.niter,
        "steps_per_epoch": r.niter,
        "finished": finished,
        "time_s": r.elapsed(),
        "cpu_s": r.cpu(),
        "top1": ev.get("top1"),
        "top5": ev.get("top5"),
        "val_loss": ev.get("loss"),
        "eval_epoch": ev.get("epoch"),
        "best_top1": r.best["top1"],
        "best_epoch": r.best["epoch"],
        "n_train": len(splits.train),
        "n_val": len(splits.val),
        "num_classes": splits.num_classes,
        "total_batch": r.meta["total_batch"],
        "nonfinite_skipped": r.step_fn.nonfinite_skipped,
        "backbone": str(r.out_dir / "backbone.pt"),
        "config": r.cfg.to_dict(),
    }
    write_json(r.out_dir / "summary.json", summary)
    if finished:
        r.log.info(
            f"done: val top-1 {_fmt(ev.get('top1'))} top-5 {_fmt(ev.get('top5'))} (best top-1 "
            f"{_fmt(r.best['top1'])} at epoch {r.best['epoch']}); backbone exported to "
            f"{r.out_dir / 'backbone.pt'}"
        )
