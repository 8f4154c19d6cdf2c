"""Training checkpoints: atomic writes, exact-resume state, compatibility checks, export.

``DIR/checkpoint.pt`` holds everything needed to continue a run bit-for-bit on the same
hardware: student, teacher, optimizer (AdamW or SOAP state), the DINO loss centre, the
GradScaler, the global step, the RNG states and the config. ``meta["backbone"]`` (a
``BackboneSpec`` dict) and ``teacher`` (``backbone.*`` keys) are what
``dino_skipless.models.load_backbone`` reads, so the checkpoint itself is also a backbone.
The exported ``backbone.pt`` (state dict without prefix, and the spec that rebuilds it) +
``backbone.json`` (the same spec, readable) is the small, stable artefact the evaluation stages
load.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import atomic_write_text, temp_file_beside
from ..models.loading import (
    CheckpointError,
    CheckpointRefused,
    export_payload,
    safe_torch_load,
)
from .config import PretrainConfig, config_from_dict
from .runlog import truncate_jsonl
from .state import RunState

CHECKPOINT = "checkpoint.pt"
# The teacher backbone before the first step (= the student's init): the exact random-init
# floor of this run, evaluated with ``--ckpt DIR/init``.
INIT_DIR = "init"
FORMAT_VERSION = 1
# Settings a resumed run must share with its checkpoint: they fix parameter/optimizer shapes or
# the meaning of the stored state.
MUST_MATCH = (
    "arch",
    "variant",
    "optimizer",
    "patch_size",
    "depth",
    "embed_dim",
    "out_dim",
    "norm_last_layer",
    "use_bn_in_head",
    "n_crops",
)


# Config keys a resumed run may set to other values than the run started with: where and how
# it runs, what it logs and saves, when it stops, what it does on a fault (a run stopped by a
# bad image or a NaN may go on with data.on_error=skip / run.on_nonfinite=skip, the advice its
# error gives), and optim.epochs (more epochs: the cosine schedules are recomputed for the new
# length from the step reached, as the official code does on resume). Every other key (the
# recipe, the data, the seed, the precision) shapes the trajectory: changing it mid-run would
# make a run that no config describes, so --resume refuses and names it.
RESUME_MAY_CHANGE = frozenset(
    {
        "name",
        "optim.epochs",
        "data.num_workers",
        "data.pin_memory",
        "data.on_error",
        "data.max_bad_fraction",
        "data.max_image_pixels",  # the bomb limit its error names (a fault policy, as on_error)
        "run.out",
        "run.device",
        "run.compile",
        "run.compile_step",
        "run.compile_backend",
        "run.dist_timeout_s",
        "run.cpu_threads",
        "run.saveckp_freq",
        "run.keep_epochs",
        "run.ckpt_every_steps",
        "run.max_steps",
        "run.log_every",
        "run.on_nonfinite",
        "run.progress",
        "run.tensorboard",
        "run.jacobian_every_epochs",
        "run.jacobian_tokens",
        "run.collapse_window",
        "run.collapse_min_info",
        "run.on_collapse",
        # how the online k-NN monitor scores (and, in _same, monitor.knn_every between non-zero
        # values), not which images it holds out of pretraining (knn_every 0 <-> N, knn_holdout,
        # knn_holdout_fraction, knn_queries, knn_root)
        "monitor.knn_k",
        "monitor.knn_temperature",
        "monitor.knn_bank",
        "monitor.knn_resolution",
        "monitor.knn_batch_size",
    }
)


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed by this run (the message lists what differs)."""


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"section.key": value}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _same(key: str, a, b) -> bool:
    if key == "data.path" and a and b:  # one folder, named relatively once and absolutely once
        return a == b or Path(a).resolve() == Path(b).resolve()
    if key == "monitor.knn_every":  # off <-> on changes the images held out of pretraining
        return (a == 0) == (b == 0)
    return a == b


def check_resume_config(saved: dict, cfg: PretrainConfig, step: int, niter: int, path) -> None:
    """Refuse to resume the run of ``saved`` (the config stored in its checkpoint) with ``cfg``
    when a key outside ``RESUME_MAY_CHANGE`` differs (all of them are named), or when
    ``optim.epochs`` ends before the step the run has reached."""
    have = flat_keys(config_from_dict(saved).to_dict())
    want = flat_keys(cfg.to_dict())
    diffs = [
        f"{k}: checkpoint {have.get(k)!r} vs this run {want.get(k)!r}"
        for k in sorted(set(have) | set(want))
        if k not in RESUME_MAY_CHANGE and not _same(k, have.get(k), want.get(k))
    ]
    if diffs:
        raise ResumeError(
            f"cannot resume {path} with settings that change the training itself:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the run's own values (--resume without --config or overrides "
            "reuses them), or train into a new --out. A resumed run may change only: "
            + ", ".join(sorted(RESUME_MAY_CHANGE))
        )
    done = step // niter
    if cfg.optim.epochs * niter < step:
        raise ResumeError(
            f"cannot resume {path} with optim.epochs={cfg.optim.epochs}: the run has already "
            f"done {done} epochs (step {step}); give optim.epochs >= {done}"
        )


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` into a temp file in the same folder, fsync, then ``os.replace``.

    A crash at any point leaves either the old file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Files of a run folder that are written through a temp file (``.NAME.XXXX.tmp``).
_ATOMIC_PREFIXES = (f".{CHECKPOINT}.", ".checkpoint_epoch", ".backbone", ".config.yaml.")
_ATOMIC_PREFIXES += (".summary.json.", ".log.jsonl.", ".epochs.jsonl.")


def remove_stale_temp_files(out_dir: str | Path) -> list[Path]:
    """Delete the temp files that atomic writes of a killed run left in ``out_dir``.

    Only this run's folder, only our names: a run owns its folder (a fresh start refuses an
    existing checkpoint), so no other writer can be using them."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    stale = sorted(
        p
        for p in out_dir.iterdir()
        if p.name.endswith(".tmp") and p.name.startswith(_ATOMIC_PREFIXES) and p.is_file()
    )
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def rng_state() -> dict:
    # numpy's state as plain lists: a checkpoint of tensors, containers and numbers loads with
    # torch.load(weights_only=True), which runs no code from the file.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]  # older checkpoints: keys as a uint32 array
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def load_checkpoint(
    path: str | Path, trust: bool = False, required: tuple[str, ...] = ("student", "meta")
) -> dict:
    """A training checkpoint holding the ``required`` entries (DINO's by default)."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(
            f"--resume: no checkpoint at {path} (a run writes DIR/{CHECKPOINT}; check --out)"
        )
    try:
        ckpt = safe_torch_load(path, trust)
    except CheckpointRefused as e:  # pretraining has no --trust-checkpoint: it never needs one
        raise ResumeError(
            f"refused to load {path}: it needs the global {e.name}, which is not allowed "
            "(unpickling it could run code stored in the file); the checkpoints that "
            "dino_skipless.pretrain writes need none, so this file is not one of them"
        ) from None
    except CheckpointError as e:  # refused, or corrupt/truncated (not by our atomic writes)
        raise ResumeError(str(e)) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise ResumeError(
            f"{path} is not a checkpoint of this trainer (it needs the entries "
            f"{', '.join(required)})"
        )
    return ckpt


def check_compatible(
    saved: dict, current: dict, path: str | Path, keys: tuple[str, ...] = MUST_MATCH
) -> None:
    """Refuse to resume when any of ``keys`` (DINO's ``MUST_MATCH``) of the run meta differs."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise ResumeError(
            f"cannot resume from {path}: it was trained with different settings:\n  "
            + "\n  ".join(diffs)
            + "\nUse the checkpoint's settings, or a new --out to start a fresh run."
        )
    if saved.get("niter_per_ep") != current.get("niter_per_ep"):
        raise ResumeError(
            f"cannot resume from {path} exactly: it had {saved.get('niter_per_ep')} iterations "
            f"per epoch (total batch {saved.get('total_batch')}), this run has "
            f"{current.get('niter_per_ep')} (total batch {current.get('total_batch')}); use the "
            "same data, batch_size_per_gpu and number of processes"
        )


def export_backbone(backbone: torch.nn.Module, out_dir: str | Path, stem: str = "backbone"):
    """``DIR/<stem>.pt`` (unprefixed state dict + the BackboneSpec that rebuilds it,
    ``models.loading.export_payload``) + ``DIR/<stem>.json`` (the same spec, for reading)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(export_payload(backbone), out_dir / f"{stem}.pt")
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(backbone.spec.to_dict(), indent=2))
    return out_dir / f"{stem}.pt"


# ---------------------------------------------------------------------------------------------
# A training run's state: save and exact resume
# ---------------------------------------------------------------------------------------------


def save_checkpoint(r: RunState, path: Path) -> None:
    """Rank 0 writes the full state for an exact resume at ``r.step`` (atomically)."""
    if path.name == CHECKPOINT:
        r.saved_step = r.step
    if not r.env.is_main:
        return
    state = {
        "student": r.student.state_dict(),
        "teacher": r.teacher.state_dict(),
        "optimizer": r.optimizer.state_dict(),
        "dino_loss": r.loss_fn.state_dict(),
        "teacher_temp_scale": r.loss_fn.teacher_temp_scale,
        "scaler": r.scaler.state_dict() if r.scaler.is_enabled() else None,
        "step": r.step,
        "epoch": r.step // r.niter_per_ep,
        "sampler": {"epoch": r.step // r.niter_per_ep, "skip_batches": r.step % r.niter_per_ep},
        "nonfinite_skipped": r.nonfinite_skipped,
        "collapse": r.collapse.state_dict(),
        "bad_images": dict(r.bad_images),
        "epoch_loss": dict(r.epoch_loss),
        "elapsed_s": r.elapsed(),
        "rng": rng_state(),
        "config": r.cfg.to_dict(),
        "meta": r.meta,
    }
    atomic_torch_save(state, path)


def resume(r: RunState) -> None:
    """Restore the state of ``DIR/checkpoint.pt`` into ``r`` (and the RNGs), so the run
    continues as if it had not stopped; log records written after it are dropped."""
    path = r.out_dir / CHECKPOINT
    ckpt = load_checkpoint(path)
    if "config" in ckpt:
        check_resume_config(ckpt["config"], r.cfg, int(ckpt["step"]), r.niter_per_ep, path)
    check_compatible(ckpt["meta"], r.meta, path)
    r.student.load_state_dict(ckpt["student"])
    r.teacher.load_state_dict(ckpt["teacher"])
    r.optimizer.load_state_dict(ckpt["optimizer"])
    r.loss_fn.load_state_dict(ckpt["dino_loss"])
    scale = float(ckpt.get("teacher_temp_scale", 1.0))
    if scale != 1.0:  # the calibrated temperature of the run's start (dino/calibrate.py)
        r.loss_fn.teacher_temp_schedule = r.loss_fn.teacher_temp_schedule * scale
        r.loss_fn.teacher_temp_scale = scale
    if r.scaler.is_enabled() and ckpt.get("scaler"):
        r.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    r.step = int(ckpt["step"])
    r.nonfinite_skipped = int(ckpt.get("nonfinite_skipped", 0))
    r.collapse.load_state_dict(ckpt.get("collapse", {}))
    r.bad_images = dict(ckpt.get("bad_images", r.bad_images))
    r.epoch_loss = dict(ckpt.get("epoch_loss", r.epoch_loss))
    r.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
    r.saved_step = r.step
    if r.env.is_main:
        dropped = truncate_jsonl(r.out_dir / "log.jsonl", r.step)
        # evaluations made at the saved step (epoch ends) belong to the run that continues
        truncate_jsonl(r.out_dir / "knn.jsonl", r.step + 1)
        truncate_jsonl(r.out_dir / "jacobian.jsonl", r.step + 1)
        extra = f"; dropped {dropped} log records written after it" if dropped else ""
        r.log.info(
            f"resumed from {path} at step {r.step} (epoch {r.step // r.niter_per_ep}, "
            f"iteration {r.step % r.niter_per_ep}/{r.niter_per_ep}){extra}"
        )
