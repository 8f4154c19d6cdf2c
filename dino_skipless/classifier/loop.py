"""The one supervised training loop of the project.

Both supervised trainers run it: the paper's classifier (``classifier.trainer``, Sec. 6.1) and the
small-scale ceilings (``dino_skipless.supervised``). What differs between them is passed in: the
batches of a data epoch (``batches``), the loss of a micro-batch (``loss_fn``) and what happens at
the end of a schedule epoch (``on_epoch_end``: the classifier evaluates and checkpoints).

One step (``TrainStep``), as the weight-selection code's ``engine.train_one_epoch``:

1. the step's lr and weight decay from the per-iteration schedules (every group's lr, group 0's
   weight decay);
2. for each of ``accum`` micro-batches: ``loss_fn(forward, batch, step, k)`` (the loss and its
   counters) under autocast, ``loss / accum`` backward (DDP gradient sync only on the last);
3. the mean loss over micro-batches and processes must be finite: else stop, naming the step
   (``on_nonfinite="stop"``, as engine.py), or drop the gradients and count the step ("skip");
4. optional global-norm gradient clipping, then the optimizer step (through a GradScaler that
   only acts with fp16).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..dino.distributed import all_reduce_mean
from ..dino.runlog import RunLogger, memory_gb, progress_bar
from ..dino.schedules import Schedules, apply_schedules_
from ..dino.trainer import autocast, make_grad_scaler


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step."""


@dataclass
class StepResult:
    loss: float | None  # mean over micro-batches and processes; None: a skipped step
    stats: dict  # this process's sums of the loss_fn's counters (e.g. hits, seen)
    lr: float
    wd: float


def _grad_norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.norm(2) for g in grads]), 2))


class TrainStep:
    """One optimisation step over ``accum`` micro-batches (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedules: Schedules,
        *,
        forward: nn.Module | None = None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        clip_grad: float = 0.0,
        on_nonfinite: str = "stop",
        on_error: Callable[[str], None] | None = None,
    ):
        self.model, self.optimizer, self.schedules = model, optimizer, schedules
        self.forward = forward if forward is not None else model  # DDP / compiled wrapper
        self.device, self.precision = torch.device(device), precision
        self.clip_grad, self.on_nonfinite = clip_grad, on_nonfinite
        self.scaler = make_grad_scaler(precision)  # a pass-through unless fp16
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.nonfinite_skipped = 0
        self.on_error = on_error
        self.last_grad_norm: float | None = None  # the pre-clip norm when clipping computed it

    def __call__(self, step: int, micro_batches: list, loss_fn: Callable) -> StepResult:
        s = self.schedules.at(step)
        apply_schedules_(self.optimizer, s["lr"], s["wd"])
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        stats: dict[str, float] = {}
        for k, batch in enumerate(micro_batches):
            last = k == n - 1
            sync = self.forward.no_sync if (not last and hasattr(self.forward, "no_sync")) else None
            with sync() if sync else contextlib.nullcontext():
                with autocast(self.precision, self.device):
                    loss, batch_stats = loss_fn(self.forward, batch, step, k)
                self.scaler.scale(loss / n if n > 1 else loss).backward()
            total = total + loss.detach().float() / n
            for key, v in batch_stats.items():
                stats[key] = stats.get(key, 0) + v
        loss_value = all_reduce_mean(total).item()
        if not math.isfinite(loss_value):
            if self.on_nonfinite == "stop":
                msg = (
                    f"loss is {loss_value} at step {step}; stopping. Lower optim.lr, check the "
                    "data, or set run.on_nonfinite=skip to skip such steps"
                )
                if self.on_error:
                    self.on_error(msg)
                raise NonFiniteLossError(msg)
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_skipped += 1
            return StepResult(None, stats, s["lr"], s["wd"])
        self.last_grad_norm = None
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
            norm = nn.utils.clip_grad_norm_(self.params, self.clip_grad)
            self.last_grad_norm = float(norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepResult(loss_value, stats, s["lr"], s["wd"])

    def grad_norm(self) -> float:
        """The last step's gradient norm (pre-clip when clipping is on), for the logs; the
        scaler's ``step`` has unscaled fp16 gradients in place by then."""
        if self.last_grad_norm is not None:
            return self.last_grad_norm
        return _grad_norm(self.params)


@dataclass
class LoopState:
    """What the loop advances; the classifier's checkpoint saves and restores it."""

    step: int = 0  # optimisation steps done
    losses: list[float] = field(default_factory=list)  # every finite loss of this process
    epoch_loss: dict = field(default_factory=lambda: {"sum": 0.0, "count": 0})
    window: dict = field(default_factory=lambda: {"sum": 0.0, "count": 0})  # since the last log
    stats: dict = field(default_factory=dict)  # loss_fn counters of the current schedule epoch
    last_stats: dict = field(default_factory=dict)  # the counters of the last finished epoch
    last_epoch_loss: float | None = None  # mean loss of the last finished epoch

    def state_dict(self) -> dict:
        """What a checkpoint keeps (``losses`` stays in log.jsonl)."""
        keys = ("step", "epoch_loss", "window", "stats", "last_stats", "last_epoch_loss")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


@dataclass
class Loop:
    """How the loop runs; ``run`` executes it from ``state.step`` to ``total_steps``.

    ``batches(data_epoch, skip)``: the micro-batches of a data epoch, the first ``skip`` dropped
    (a resume). ``steps_per_epoch``: steps of one schedule epoch. ``epoch_steps``: steps taken
    from one data epoch: ``steps_per_epoch`` for the classifier (the rest of an epoch's batches is
    dropped, as engine.py); ``None`` cycles the data, taking every full step a data epoch gives
    (the ceilings, whose labelled set is smaller or larger than the DINO epoch they match).
    """

    step_fn: TrainStep
    loss_fn: Callable
    batches: Callable[[int, int], Iterable]
    total_steps: int
    steps_per_epoch: int
    accum: int = 1
    epoch_steps: int | None = None
    stop_at: int | None = None  # run.max_steps
    log: RunLogger | None = None
    log_every: int = 10
    total_batch: int = 1  # images per step over all processes (img/s)
    progress: bool = False
    epochs: int = 0  # for the progress bar's label
    on_epoch_end: Callable[[int], None] | None = None  # schedule epoch just finished (1-based)
    on_step_end: Callable[[int], None] | None = None  # step just finished (1-based count)

    def run(self, state: LoopState) -> bool:
        """Train until ``total_steps`` (True) or ``stop_at`` (False)."""
        end = self.total_steps if self.stop_at is None else min(self.total_steps, self.stop_at)
        if self.epoch_steps:
            data_epoch, skip = divmod(state.step, self.epoch_steps)
        else:
            data_epoch, skip = 0, 0  # the cycled ceilings start from step 0 only
        self._t, self._n = time.perf_counter(), 0
        bar = None if self.epoch_steps else progress_bar(end, state.step, "steps", self.progress)
        while state.step < end:
            limit = end if not self.epoch_steps else min(end, (data_epoch + 1) * self.epoch_steps)
            if self.epoch_steps:  # one bar per epoch, as pretraining's
                bar = progress_bar(
                    self.epoch_steps, skip, f"epoch {data_epoch + 1}/{self.epochs}", self.progress
                )
            it = iter(self.batches(data_epoch, skip * self.accum))
            start = state.step
            while state.step < limit:
                micro = list(itertools.islice(it, self.accum))
                if len(micro) < self.accum:
                    break  # the data epoch ran out (cycled data): on to the next one
                self._step(state, micro, bar)
            if self.epoch_steps:
                bar.close()
            if state.step == start:
                raise ValueError(
                    f"data epoch {data_epoch} gave no full step ({self.accum} micro-batch(es) "
                    "of data.batch_size_per_gpu images per process); add images or lower the batch"
                )
            data_epoch, skip = data_epoch + 1, 0
        if not self.epoch_steps:
            bar.close()
        return state.step >= self.total_steps

    def _step(self, state: LoopState, micro: list, bar) -> None:
        res = self.step_fn(state.step, micro, self.loss_fn)
        self._record(state, res)
        state.step += 1
        self._n += 1
        bar.update(1)
        if res.loss is not None:
            bar.set_postfix({"loss": f"{res.loss:.4f}", "lr": f"{res.lr:.2e}"})
        epoch_done = state.step % self.steps_per_epoch == 0
        if self.log and (state.step % self.log_every == 0 or epoch_done):
            dt = max(time.perf_counter() - self._t, 1e-9)
            self._log(state, res, self.total_batch * self._n / dt)
            self._t, self._n = time.perf_counter(), 0
        if epoch_done:
            state.last_stats, state.stats = state.stats, {}
            e = state.epoch_loss
            state.last_epoch_loss = e["sum"] / e["count"] if e["count"] else None
            state.epoch_loss = {"sum": 0.0, "count": 0}
            if self.on_epoch_end:
                self.on_epoch_end(state.step // self.steps_per_epoch)
        if self.on_step_end:
            self.on_step_end(state.step)

    @staticmethod
    def _record(state: LoopState, res: StepResult) -> None:
        for key, v in res.stats.items():
            state.stats[key] = state.stats.get(key, 0) + v
        if res.loss is None:
            return
        state.losses.append(res.loss)
        for acc in (state.epoch_loss, state.window):
            acc["sum"] += res.loss
            acc["count"] += 1

    def _log(self, state: LoopState, res: StepResult, img_s: float) -> None:
        w = state.window
        self.log.log(
            {
                "step": state.step - 1,  # the iteration index, as pretraining's log.jsonl
                "epoch": (state.step - 1) // self.steps_per_epoch,
                "loss": res.loss,
                "loss_mean": w["sum"] / w["count"] if w["count"] else None,  # since the last record
                "lr": res.lr,
                "wd": res.wd,
                "grad_norm": self.step_fn.grad_norm(),
                "img_per_s": img_s,
                "mem_gb": memory_gb(self.step_fn.device),
                "nonfinite_skipped": self.step_fn.nonfinite_skipped,
            }
        )
        state.window = {"sum": 0.0, "count": 0}
