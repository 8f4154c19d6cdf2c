"""Claiming a stage's output folder before any work: writable, one run at a time, and not
holding another stage's results.

``claim_out_dir(OUT, stage)`` (a context manager; stages take it through
``dino_skipless.cli.hold_out_dir``):

- creates ``OUT`` (and its parents), or says in one line why it cannot: a file in the way, no
  permission. A read-only or misspelt ``--out`` fails before the compute, not after it;
- takes an exclusive lock, ``OUT/.skipless.lock`` (``flock``: the kernel drops it when the
  holder exits, however it exits). A second run into the same folder is refused with the
  holder's PID, host, start time and command; a lock file left behind by a run that died is
  taken over (its lock died with it), and said so;
- refuses a folder whose report (``results.json`` unless said otherwise) was written by another
  stage (``report_stage``): a TokenCut run must not overwrite a probe's results;
- on exit (return, error or Ctrl-C) releases the lock, deletes the lock file and removes the
  folders it created if nothing was written into them.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".skipless.lock"
REPORT = "results.json"


class OutDirError(UserError):
    """The output folder cannot be used (not creatable or writable, in use, another stage's)."""


# ------------------------------------------------------------------------------ whose report


def report_stage(record: dict) -> str | None:
    """The stage that wrote a report: its ``stage`` key, or for files written before that key
    existed, the stage its own keys give away (None: not one of ours)."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("stage"), str):
        return record["stage"]
    guesses = (
        ("corloc", "tokencut.run"),
        ("miou", "eval.linprobe"),
        ("runs", "eval.linprobe"),  # sweep.json
        ("top1", "eval.knn"),
        ("miou_a", "eval.compare"),
        ("reported", "tokencut.compare"),
        ("columns", "dino_skipless.pca"),
        ("records", "dino_skipless.jacobian"),
    )
    return next((stage for key, stage in guesses if key in record), None)


def check_report_owner(path: str | os.PathLike, stage: str) -> None:
    """Refuse to let ``stage`` replace the report at ``path`` when another stage wrote it (a
    rerun of the same stage replaces its own report, as it always did)."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        owner = report_stage(json.loads(path.read_text("utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        owner = None
    if owner != stage:
        who = f"the results of {owner}" if owner else "a file that no stage of this project wrote"
        raise OutDirError(
            f"{path} is {who}; {stage} would overwrite it: choose another --out (or delete it)"
        )


# ------------------------------------------------------------------------------ the lock


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _describe(h: dict) -> str:
    if not h.get("pid"):
        return "another process (it has not written its details yet)"
    when = h.get("started", "?")
    return f"PID {h['pid']} on {h.get('host', '?')}, started {when} ({h.get('command', '?')})"


def _lock(path: Path) -> tuple[int, dict]:
    """``(fd, previous holder's details)`` once ``path`` is locked by this process."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutDirError(
                f"{path.parent} is in use by {_describe(holder)}: wait for that run to end, or "
                "choose another --out"
            ) from None
        # A holder that was releasing may have unlinked the file we locked: lock the new one.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd, _holder(fd)
        except FileNotFoundError:
            pass
        os.close(fd)


def _write_holder(fd: int, stage: str) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "stage": stage,
        "command": " ".join(["python", *sys.argv]) if sys.argv else stage,
    }
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))


def _make_dirs(out: Path, flag: str = "--out") -> list[Path]:
    """Create ``out`` and missing parents; returns the folders created (outermost first)."""
    missing = []
    p = out
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutDirError(f"{flag} {out}: a file is in the way (expected a folder)") from None
    except OSError as e:
        raise OutDirError(f"{flag} {out}: cannot create the folder ({e.strerror})") from None
    if not out.is_dir():
        raise OutDirError(f"{flag} {out}: a file is in the way (expected a folder)")
    return missing[::-1]


def check_out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """A report file's path, checked before the work that makes it: its folder exists or can
    be made, and the path itself is not a folder. (Reports of the compare tools and the data
    checker: written in one atomic step at the end, so they take no lock.)"""
    path = Path(path)
    if path.is_dir():
        raise OutDirError(f"{flag} {path} is a folder (expected a file path)")
    _make_dirs(path.parent, flag)
    return path


@contextmanager
def claim_out_dir(
    out: str | os.PathLike,
    stage: str,
    *,
    report: str | None = REPORT,
    lock_name: str = LOCK_NAME,
    enabled: bool = True,
):
    """Hold ``out`` for ``stage`` (see the module docstring); yields ``out`` as a Path.
    ``report``: the file name whose owner is checked (None: no check); ``enabled=False`` (a
    process other than rank 0) claims nothing."""
    out = Path(out)
    if not enabled:
        yield out
        return
    created = _make_dirs(out)
    lock = out / lock_name
    fd = None
    try:
        try:
            fd, before = _lock(lock)
        except OSError as e:
            raise OutDirError(f"--out {out}: not writable ({e.strerror})") from None
        _write_holder(fd, stage)
        if before.get("pid") and before["pid"] != os.getpid():
            print(
                f"note: took over the lock that {_describe(before)} left in {out} (that run is "
                "over)",
                file=sys.stderr,
            )
        if report is not None:
            check_report_owner(out / report, stage)
        yield out
    finally:
        if fd is not None:
            try:
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    lock.unlink()
            except FileNotFoundError:
                pass
            os.close(fd)
        for d in reversed(created):  # innermost first; a folder with anything in it stays
            try:
                d.rmdir()
            except OSError:
                break
