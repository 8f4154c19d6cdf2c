"""Writing a stage's outputs: atomic text/JSON/npz files, the ``OUT.json`` + ``OUT.md`` report, a
Markdown table and the re-runnable command line every results file records.

Every file is written through a temporary file in its folder and renamed into place, so a
reader (or a killed run) never sees half a file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import yaml


def current_umask() -> int:
    umask = os.umask(0o022)  # the only way to read the umask is to set it
    os.umask(umask)
    return umask


def temp_file_beside(path: Path) -> tuple[int, str]:
    """``mkstemp`` in ``path``'s folder, with the permissions ``open()`` would give: mkstemp
    makes 0600 files, which colleagues sharing the results folder could not read."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file + rename so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write(binary file)`` into a temporary file beside ``path``, then rename it into place
    (a figure's ``savefig``, ``np.savez``...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_npz(path: str | os.PathLike, **arrays) -> None:
    """``np.savez_compressed`` of ``arrays``, atomically."""
    atomic_write_with(path, lambda f: np.savez_compressed(f, **arrays))


def new_run_id() -> str:
    """Stamped into every file of one stage run, so a reader can tell files of two runs apart
    (a reused ``--out`` may still hold another run's files)."""
    return uuid.uuid4().hex[:16]


def portable_path(value: str) -> str:
    """An absolute path as a reader elsewhere can use it: ``$SKIPLESS_CACHE/...`` when inside the
    cache folder that variable names, relative to the working directory when inside it, ``~/...``
    when inside the home directory, else unchanged. Results must not record the writer's machine
    layout (and the relative form re-runs from the repo root)."""
    if not value.startswith(os.sep):
        return value
    bases = [(Path.cwd(), ""), (Path.home(), "~")]
    if os.environ.get("SKIPLESS_CACHE"):
        bases.insert(0, (Path(os.environ["SKIPLESS_CACHE"]).absolute(), "$SKIPLESS_CACHE"))
    for base, prefix in bases:
        try:
            rel = Path(value).relative_to(base)
        except ValueError:
            continue
        return str(Path(prefix) / rel) if prefix else str(rel) or "."
    return value


def _portable(obj):
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_portable(v) for v in obj]
    if isinstance(obj, Path):
        obj = str(obj)
    return portable_path(obj) if isinstance(obj, str) else obj


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomic, indented JSON; absolute paths in string values are written portably."""
    text = json.dumps(_portable(obj), indent=2, default=_json_default)
    atomic_write_text(path, text + "\n")


def write_yaml(path: str | os.PathLike, obj) -> None:
    """Atomic YAML in the given key order; absolute paths written portably, as by ``write_json``
    (a run's ``config.yaml`` then records ``$SKIPLESS_CACHE/...``, not the writer's layout)."""
    atomic_write_text(path, yaml.safe_dump(_portable(obj), sort_keys=False))


def write_report(out: str | os.PathLike, obj, text: str) -> None:
    """``OUT.json`` (the record) and ``OUT.md`` (the printed table) side by side."""
    out = Path(out)
    write_json(out.with_suffix(".json"), obj)
    atomic_write_text(out.with_suffix(".md"), text)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if (abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-2)) else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The running command as ``python -m package.module args``, re-runnable from the working
    directory: ``python -m`` puts the script's full path in ``sys.argv[0]``, and a results file
    must not record this machine's layout."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    head = [sys.argv[0]] if sys.argv else []
    if script is not None and script.suffix == ".py":
        parts = []
        for parent in script.parents:  # walk up while the folder is a package
            parts.insert(0, parent.name)
            if not (parent / "__init__.py").is_file():
                parts.pop(0)
                break
        module = ".".join([*parts, script.stem])
        if parts:
            head = ["-m", module]
        else:
            try:
                head = [str(script.relative_to(Path.cwd()))]
            except ValueError:
                head = [script.name]
    return " ".join(["python", *head, *sys.argv[1:]])
