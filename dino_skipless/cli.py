"""Flags and helpers every command-line stage shares, so each CLI stays a thin layer.

Every evaluation stage takes ``--ckpt PATH`` (our export, our training checkpoint, an official
DINO checkpoint or a timm state dict) or ``--random-init VARIANT --arch ARCH`` for an untrained
baseline, plus ``--device``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import re
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .models import (
    ARCHS,
    TRUST_HELP,
    VARIANT_HELP,
    VARIANTS,
    BackboneSpec,
    build_model,
    load_backbone,
)


def add_backbone_args(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    g = parser.add_argument_group("backbone")
    # One figure or table may mix trained checkpoints with random-init baselines.
    src = g if multiple else g.add_mutually_exclusive_group()
    if multiple:
        src.add_argument(
            "--ckpt",
            action="append",
            default=None,
            metavar="PATH",
            help="checkpoint (repeatable): backbone.pt/.safetensors (+ .json), checkpoint.pt, "
            "official DINO or timm weights",
        )
    else:
        src.add_argument(
            "--ckpt",
            metavar="PATH",
            help="backbone.pt/.safetensors (+ .json), checkpoint.pt, official DINO or timm weights",
        )
    src.add_argument(
        "--random-init",
        metavar="VARIANT",
        choices=VARIANTS,
        action="append" if multiple else "store",
        help=f"untrained baseline of this variant ({VARIANT_HELP})",
    )
    g.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    g.add_argument("--arch", default="vit_small", choices=sorted(ARCHS), help="with --random-init")
    g.add_argument("--patch-size", type=int, default=16, help="with --random-init")
    g.add_argument("--depth", type=int, default=None, help="with --random-init (default: arch's)")
    g.add_argument("--seed", type=int, default=0, help="seed of random inits and sampling")
    g.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    add_debug_arg(parser)


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the full Python traceback"
    )


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DatasetError
    from .dino.checkpoint import ResumeError
    from .models import CheckpointError

    return (DatasetError, CheckpointError, ResumeError, pickle.UnpicklingError)


_WORKER_TB = "Original Traceback (most recent call last):"


def error_message(e: BaseException) -> str:
    """The message of ``e``; for an error re-raised from a DataLoader worker, the original one
    (PyTorch prepends the worker's whole traceback to it)."""
    msg = str(e)
    if _WORKER_TB in msg:
        tail = msg.split(_WORKER_TB, 1)[1].splitlines()
        # the traceback's frames are indented; the original "pkg.Type: message" line is not
        start = next((i for i, line in enumerate(tail) if line and not line[0].isspace()), None)
        if start is not None:
            msg = "\n".join(tail[start:])
            msg = re.sub(r"^[\w.]+: ", "", msg, count=1)
    return msg.strip() or type(e).__name__


def cli_main(fn: Callable) -> Callable:
    """Wrap a stage's ``main(argv)``: a user error (bad data, checkpoint or resume) ends the
    program with its message on one or two lines and exit status 1 instead of a traceback;
    ``--debug`` re-raises it with the traceback."""

    @functools.wraps(fn)
    def wrapper(argv: Sequence[str] | None = None, *a, **kw):
        try:
            return fn(argv, *a, **kw)
        except _user_errors() as e:
            if "--debug" in (sys.argv[1:] if argv is None else argv):
                raise
            raise SystemExit(f"error: {error_message(e)}\n(--debug shows the traceback)") from None

    return wrapper


def default_num_workers(wanted: int = 4) -> int:
    """``wanted`` loader workers, capped at the CPUs this process may use: more workers than
    cores only contend (and PyTorch warns about it)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(wanted, cpus))


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {name}: CUDA is not available on this machine; use --device cpu"
        )
    return dev


def _random_backbone(args, variant: str) -> tuple[torch.nn.Module, BackboneSpec, str]:
    model = build_model(
        args.arch, variant, seed=args.seed, patch_size=args.patch_size, depth=args.depth
    ).eval()
    return model, model.spec, f"random-{variant}"


def backbones_from_args(args) -> list[tuple[torch.nn.Module, BackboneSpec, str]]:
    """``[(model, spec, label)]`` for every ``--ckpt`` / ``--random-init`` given (eval mode, CPU)."""
    ckpts = args.ckpt if isinstance(args.ckpt, list) else ([args.ckpt] if args.ckpt else [])
    inits = args.random_init
    inits = inits if isinstance(inits, list) else ([inits] if inits else [])
    if not ckpts and not inits:
        raise SystemExit("give a backbone: --ckpt PATH or --random-init VARIANT [--arch ARCH]")
    out = []
    for path in ckpts:
        model, spec = load_backbone(path, trust=getattr(args, "trust_checkpoint", False))
        out.append((model, spec, label_for(path, spec)))
    for variant in inits:
        out.append(_random_backbone(args, variant))
    return out


def backbone_from_args(args) -> tuple[torch.nn.Module, BackboneSpec, str]:
    return backbones_from_args(args)[0]


def label_for(path: str | os.PathLike, spec: BackboneSpec) -> str:
    p = Path(path)
    name = (
        p.parent.name
        if p.name in ("backbone.pt", "backbone.safetensors", "checkpoint.pt")
        else p.stem
    )
    return f"{name} ({spec.variant})" if name else spec.variant


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


def new_run_id() -> str:
    """Stamped into every file of one stage run, so a reader can tell files of two runs apart
    (a reused ``--out`` may still hold another run's files)."""
    return uuid.uuid4().hex[:16]


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


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
