"""Flags and helpers every command-line stage shares, so each CLI stays a thin layer.

Every evaluation stage takes ``--ckpt PATH`` (our export, our training checkpoint, an official
DINO checkpoint or a timm state dict) or ``--random-init VARIANT --arch ARCH`` for an untrained
baseline, plus ``--device``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pickle
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .data import DatasetError
from .data.files import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels
from .dino.checkpoint import ResumeError
from .dino.config import ConfigError
from .errors import UserError

# scripts/bench_tokencut.py still imports markdown_table from here
from .fileio import markdown_table as markdown_table
from .models import (
    ARCHS,
    TRUST_HELP,
    VARIANT_HELP,
    VARIANTS,
    BackboneSpec,
    CheckpointError,
    build_model,
    load_backbone,
)
from .outdir import claim_out_dir
from .ranges import AT_LEAST_1, FINITE, NON_NEGATIVE, Range


def add_synthetic_args(p: argparse.ArgumentParser, n: int = 40, size: int = 128) -> None:
    """``--synthetic-n/-size/-seed``: the generated stand-in of ``--dataset synthetic`` (the
    same flags in every evaluation stage, so the replication can pass one set to each)."""
    p.add_argument(
        "--synthetic-n", type=flag(int, AT_LEAST_1), default=n, help="--dataset synthetic: images"
    )
    p.add_argument(
        "--synthetic-size",
        type=flag(int, AT_LEAST_1),
        default=size,
        help="--dataset synthetic: side",
    )
    p.add_argument(
        "--synthetic-seed",
        type=flag(int, NON_NEGATIVE),
        default=0,
        help="--dataset synthetic: seed",
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
    add_ckpt_variant_arg(g)
    g.add_argument("--arch", default="vit_small", choices=sorted(ARCHS), help="with --random-init")
    g.add_argument(
        "--patch-size", type=flag(int, AT_LEAST_1), default=16, help="with --random-init"
    )
    g.add_argument(
        "--depth",
        type=flag(int, AT_LEAST_1),
        default=None,
        help="with --random-init (default: arch's)",
    )
    g.add_argument(
        "--seed", type=flag(int, NON_NEGATIVE), default=0, help="seed of random inits and sampling"
    )
    g.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    add_max_image_pixels_arg(parser)
    add_debug_arg(parser)


class _SetMaxImagePixels(argparse.Action):
    """Applied when parsed, into the environment, so the loader workers see it too."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value < 1:
            parser.error(f"{option_string} must be a positive number of pixels, got {value}")
        set_max_image_pixels(value)
        setattr(namespace, self.dest, value)


def add_max_image_pixels_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        action=_SetMaxImagePixels,
        default=None,
        metavar="N",
        help=f"decompression-bomb limit: an image above N pixels is a bad image (default "
        f"{DEFAULT_MAX_IMAGE_PIXELS:,}, PIL's)",
    )


def add_ckpt_variant_arg(parser) -> None:
    parser.add_argument(
        "--ckpt-variant",
        choices=VARIANTS,
        default=None,
        help="the variant of --ckpt weights that do not say (a plain state dict without its "
        "backbone.json); refused where the file says another",
    )


def add_debug_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the full Python traceback"
    )


# What ``cli_main`` reports in one message instead of a traceback.
USER_ERRORS = (
    UserError,
    ConfigError,
    DatasetError,
    CheckpointError,
    ResumeError,
    pickle.UnpicklingError,
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error form: a bad flag ends the program with one line (what
    was expected, which flag) and exit status 1, like every other user error, instead of
    argparse's usage block and status 2."""

    def error(self, message: str):
        raise SystemExit(f"error: {message} (see --help)")


def flag(kind: type, valid: Range = FINITE) -> Callable[[str], int | float]:
    """An argparse ``type``: parse ``kind`` (int or float) and check it against ``valid``
    (``dino_skipless.ranges``), e.g. ``type=flag(int, AT_LEAST_1)``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'} {valid}, got {text!r}"
            ) from None
        if value not in valid:
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


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
            with contextlib.ExitStack() as stack:
                _HELD.append(stack)
                try:
                    return fn(argv, *a, **kw)
                finally:
                    _HELD.pop()
        except USER_ERRORS as e:
            if "--debug" in (sys.argv[1:] if argv is None else argv):
                raise
            raise SystemExit(f"error: {error_message(e)}\n(--debug shows the traceback)") from None

    return wrapper


# One ExitStack per running ``cli_main`` stage: what ``hold_out_dir`` claims is released when
# that stage's main returns or fails.
_HELD: list[contextlib.ExitStack] = []


def hold_out_dir(out: str | os.PathLike, stage: str, **kw) -> Path:
    """``claim_out_dir(out, stage)`` (``dino_skipless.outdir``: created, writable, locked, not
    another stage's) for the rest of the running stage: ``cli_main`` releases it. Call it right
    after parsing the flags, before loading anything, so that a bad ``--out`` costs nothing."""
    if not _HELD:
        raise RuntimeError("hold_out_dir() needs a stage main wrapped in cli_main")
    return _HELD[-1].enter_context(claim_out_dir(out, stage, **kw))


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
        model, spec = load_backbone(
            path,
            trust=getattr(args, "trust_checkpoint", False),
            variant=getattr(args, "ckpt_variant", None),
        )
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


def parse_config_args(
    argv: Sequence[str], aliases: dict[str, str | None], usage: str, keys: Callable[[], list[str]]
) -> tuple[str | None, bool, bool, list[tuple[str, str]]]:
    """The config-driven trainers' command line (``pretrain``, ``classify``): ``--config FILE``,
    ``--resume``, ``--print-config``, ``--debug`` (skipped: the caller reads it), and overrides
    ``key=value`` / ``--key value`` / ``--key=value`` / a bare ``--flag`` (= true), in order;
    ``aliases`` renames short keys (``data`` -> ``data.path``; None: refused, pointing to
    ``run.precision``: DINO's ``--use_fp16``).

    -> (config path, resume, print_config, [(key, value), ...]) in command-line order."""
    config, resume, show, overrides = None, False, False, []
    argv = list(argv)
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok in ("-h", "--help"):
            print(usage)
            print("config keys:\n  " + "\n  ".join(keys()))
            raise SystemExit(0)
        if tok == "--resume":
            resume = True
            continue
        if tok == "--print-config":
            show = True
            continue
        if tok == "--debug":
            continue
        if tok.startswith("--"):
            key, eq, value = tok[2:].partition("=")
            if not eq:
                nxt = argv[i] if i < len(argv) else None
                if nxt is None or nxt.startswith("--") or ("=" in nxt and "/" not in nxt):
                    value = "true"  # a bare flag: --compile
                else:
                    value = nxt
                    i += 1
        elif "=" in tok:
            key, _, value = tok.partition("=")
        else:
            raise ConfigError(
                f"unexpected argument {tok!r}: use key=value, --key value, --config FILE or "
                "--resume (see --help)"
            )
        key = key.replace("-", "_")
        if key == "config":
            config = value
            continue
        if key in aliases:
            if aliases[key] is None:
                raise ConfigError(f"--{key}: use run.precision=fp16|bf16|fp32 instead")
            key = aliases[key]
        overrides.append((key, value))
    return config, resume, show, overrides
