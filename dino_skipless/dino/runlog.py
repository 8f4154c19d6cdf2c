"""Run observability: ``log.jsonl`` (one JSON object per logged iteration), a text log,
optional TensorBoard scalars, and memory probes. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch


def memory_gb(device: torch.device) -> float:
    """CUDA: peak allocated since start; CPU: current resident set size (peak if unavailable)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep it readable
    return v


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: str | Path, max_step: int) -> int:
    """Drop records with ``step >= max_step`` (written after the checkpoint a run resumes from)."""
    path = Path(path)
    if not path.exists():
        return 0
    records = read_jsonl(path)
    keep = [r for r in records if r.get("step", -1) < max_step]
    if len(keep) != len(records):
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    return len(records) - len(keep)


# What a run appends to, and so what a fresh start must not inherit from an earlier run.
APPENDED = ("log.jsonl", "log.txt", "jacobian.jsonl", "knn.jsonl", "epochs.jsonl", "tb")


def rotate_logs(out_dir: str | Path) -> Path | None:
    """Move the appended-to logs of an earlier run into ``out_dir/previous/<UTC time>``.

    For a fresh start in a folder whose run left logs but no checkpoint (killed before its first
    save): appending would mix two runs (step 0 twice). Returns the new folder, or None."""
    out_dir = Path(out_dir)
    found = [out_dir / n for n in APPENDED if (out_dir / n).exists()]
    if not found:
        return None
    dest = out_dir / "previous" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    k = 1
    while dest.exists():
        k += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{k}")
    dest.mkdir(parents=True)
    for p in found:
        os.replace(p, dest / p.name)
    return dest


class RunLogger:
    """Writes ``DIR/log.jsonl``, ``DIR/log.txt`` and (if importable) TensorBoard ``DIR/tb``."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.tb = None
        self.start = time.time()
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / "log.jsonl"
        self.text = self.out_dir / "log.txt"
        if tensorboard:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out_dir / "tb"))
            except Exception:  # tensorboard not installed: optional
                self.tb = None

    def info(self, msg: str) -> None:
        """A line for humans: stdout and DIR/log.txt (rank 0)."""
        if not self.enabled:
            return
        print(msg, flush=True)
        with open(self.text, "a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    def warn(self, msg: str) -> None:
        if not self.enabled:
            return
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)
        with open(self.text, "a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + "WARNING: " + msg + "\n")

    def error(self, msg: str) -> None:
        """The error that stops the run, also in DIR/log.txt (the caller raises it)."""
        if not self.enabled:
            return
        with open(self.text, "a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + "ERROR: " + msg + "\n")

    def log(self, record: dict) -> None:
        """One JSON object per line; scalars also go to TensorBoard under ``train/<key>``."""
        if not self.enabled:
            return
        record = {k: _finite_or_none(v) for k, v in record.items()}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, int | float):
                    self.tb.add_scalar(f"train/{k}", v, step)

    def append(self, name: str, records: list[dict]) -> None:
        """Append records to ``DIR/<name>`` (e.g. jacobian.jsonl)."""
        if not self.enabled:
            return
        with open(self.out_dir / name, "a") as f:
            for r in records:
                f.write(json.dumps({k: _finite_or_none(v) for k, v in r.items()}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """tqdm over an epoch's iterations (rank 0 only; a no-op object otherwise)."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
