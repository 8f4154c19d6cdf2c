"""Count, per training step, the calls that make the host wait for the device.

A CUDA step runs ahead of the GPU until the host asks for a value: ``Tensor.item``,
``float(t)``, ``int(t)``, ``bool(t)`` (an ``if`` on a tensor), ``tolist``, ``cpu()``, or creates a
tensor from Python data on the device (``torch.tensor(x, device=...)`` copies from pageable
memory). Each such call waits for every kernel queued before it, and the GPU idles while the host
catches up. The trainer reads values back only on logging steps (``trainer._flush``).

``HostSyncCounter`` counts those calls by patching them, so it works on any device (the tests run
it on the CPU, where none of them would wait); on CUDA ``count_train_syncs`` instead counts what
``torch.cuda.set_sync_debug_mode`` reports, the syncs that really happen. Not counted: the
optimizer's ``step`` (torch's non-fused AdamW reads its host-side step counters there; on CUDA
the trainer's AdamW is fused, counters on the device) and the loader's work (worker processes,
or the main process between steps with ``data.num_workers=0``).

    python -m dino_skipless.dino.hostsync --out syncs.json key=value ...   # one JSON per rank
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

_METHODS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__index__")
_CREATORS = ("tensor", "as_tensor")


class HostSyncCounter:
    """``with HostSyncCounter() as c:`` records host-waiting calls into ``c.calls[c.step]``;
    ``with c.paused():`` stops recording (re-entrant). ``cuda=True`` records instead the syncs
    ``torch.cuda.set_sync_debug_mode("warn")`` reports, attributed at ``c.next_step()``."""

    def __init__(self, cuda: bool = False) -> None:
        self.calls: dict[int, list[str]] = {}
        self.step = -1
        self.cuda = cuda
        self._pause = 0
        self._saved: list[tuple[object, str, object]] = []
        self._warnings: list | None = None
        self._seen = 0
        self._stack = contextlib.ExitStack()

    def _record(self, name: str) -> None:
        if not self._pause:
            self.calls.setdefault(self.step, []).append(name)

    def next_step(self) -> None:
        """The next step starts: CUDA mode files the reported syncs under the one ending."""
        if self._warnings is not None:
            new = self._warnings[self._seen :]
            self._seen = len(self._warnings)
            for w in new:
                if "synchroniz" in str(w.message):
                    self._record(str(w.message).split("\n")[0][:80])
        self.step += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._pause += 1
        try:
            yield
        finally:
            self._pause -= 1

    def _patch(self, owner, name: str, wrapper) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrapper)

    def __enter__(self) -> HostSyncCounter:
        if self.cuda:
            self._warnings = self._stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            self._stack.callback(torch.cuda.set_sync_debug_mode, previous)
            return self
        for name in _METHODS:
            original = getattr(torch.Tensor, name)

            def method(t, *a, _name=name, _orig=original, **k):
                self._record(f"Tensor.{_name}")
                with self.paused():  # e.g. __float__ -> item counts once
                    return _orig(t, *a, **k)

            self._patch(torch.Tensor, name, method)
        for name in _CREATORS:
            original = getattr(torch, name)

            def create(*a, _name=name, _orig=original, **k):
                if k.get("device") is not None:
                    self._record(f"torch.{_name}(device=...)")
                return _orig(*a, **k)

            self._patch(torch, name, create)
        return self

    def __exit__(self, *exc) -> None:
        self.next_step()  # file the last step's CUDA reports
        self.step -= 1
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()
        self._stack.close()


class _StepLoader:
    """The trainer's loader, marking where each step starts and pausing the counter while it
    fetches (the loader's own host work is not the step's)."""

    def __init__(self, loader, counter: HostSyncCounter) -> None:
        self._loader, self._counter = loader, counter

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        it = iter(self._loader)
        while True:
            with self._counter.paused():
                try:
                    batch = next(it)
                except StopIteration:
                    return
            self._counter.next_step()
            yield batch


def count_train_syncs(cfg) -> list[dict]:
    """Train ``cfg`` (a fresh run) and return, per step in order, ``{"step", "syncs",
    "calls", "logged"}``: the host-waiting calls from fetching its batch to fetching the next
    (``logged``: it wrote a log record, one of the steps allowed to wait). On CUDA the syncs
    that ``torch.cuda.set_sync_debug_mode`` reports, optimizer included."""
    from . import trainer
    from .distributed import _pick_device

    counter = HostSyncCounter(cuda=_pick_device(cfg.run.device, 0).type == "cuda")
    logged: list[int] = []
    saved = (trainer.build_loader, trainer.build_optimizer, trainer._log_step)
    build_loader, build_optimizer, log_step = saved

    def loader(*a, **k):
        ld, sampler, niter = build_loader(*a, **k)
        return _StepLoader(ld, counter), sampler, niter

    def optimizer(*a, **k):
        opt = build_optimizer(*a, **k)
        step = opt.step

        def paused_step(*sa, **sk):
            if counter.cuda:  # real syncs count wherever they are
                return step(*sa, **sk)
            with counter.paused():
                return step(*sa, **sk)

        opt.step = paused_step
        return opt

    def log(r, bar, it, *a, **k):
        logged.append(counter.step)
        return log_step(r, bar, it, *a, **k)

    trainer.build_loader, trainer.build_optimizer, trainer._log_step = loader, optimizer, log
    try:
        with counter:
            trainer.train(cfg)
    finally:
        trainer.build_loader, trainer.build_optimizer, trainer._log_step = saved
    return [
        {"step": s, "syncs": len(counter.calls.get(s, [])), "calls": counter.calls.get(s, [])}
        | {"logged": s in logged}
        for s in range(counter.step + 1)
    ]


def main(argv: list[str] | None = None) -> int:
    from .config import build_config
    from .distributed import get_rank

    args = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in args:
        print("usage: python -m dino_skipless.dino.hostsync --out FILE key=value ...")
        return 1
    k = args.index("--out")
    out = Path(args[k + 1])
    overrides = [a.split("=", 1) for a in args[:k] + args[k + 2 :]]
    steps = count_train_syncs(build_config(None, overrides))
    path = out
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        path = out.with_name(f"{out.stem}.rank{get_rank()}{out.suffix}")
    path.write_text(json.dumps(steps) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
