"""Count the aten ops a piece of code runs, as ``torch.profiler`` lists them.

A launch-bound step is one whose time goes to launching many small kernels; the number of aten
ops it dispatches is a device-independent proxy for that (``scripts/bench_loader.py`` prints the
augmentation's count next to the model forward's). "Top-level" ops are those not called from
inside another aten op (``einsum`` counts once, not as its ``bmm`` and ``permute``), which is
how the profiler's table lists a call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def count_aten_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """``(top-level, all)`` aten ops that ``fn()`` dispatches on the CPU side.

    Uses the profiler's legacy (non-Kineto) mode when available: Kineto's first start probes
    for GPUs, which takes tens of seconds on a machine with a CUDA build of torch and no driver."""
    try:
        prof = torch.autograd.profiler.profile(use_kineto=False)
    except (TypeError, RuntimeError):  # pragma: no cover - a torch without the legacy mode
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with prof:
        fn()
    events = [e for e in prof.function_events if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top), len(events)
