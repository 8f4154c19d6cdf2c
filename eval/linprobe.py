"""Dense linear probing CLI (paper Sec. 6.2.1, Table 2-3, Fig. 2).

    python -m eval.linprobe --dataset voc --root DATA/VOC --ckpt run/backbone.pt --out out/lp
    python -m eval.linprobe --dataset ade20k --root DATA/ADE --ckpt ck.pt --mode both
    python -m eval.linprobe --dataset synthetic --random-init skipless_init --arch vit_small
    python -m eval.linprobe --dataset voc --root R --sweep-ckpts a/backbone.pt b/checkpoint.pt \
        random:skipless_init --mode both --out out/table2

Protocol defaults live in ``eval.probe_lib.LinProbeConfig``. The backbone runs once per image
(block features of every requested probe cached as fp16); all lrs train together.

``DIR/results.json``: ``miou`` (best over the lr sweep, %), ``best_lr``, ``layers``, ``per_lr``
(lr -> mIoU %), ``per_lr_pacc``, ``pacc``, ``per_class_iou`` (class -> IoU %, null when the class
is absent from both ground truth and predictions), plus ``dataset``, ``checkpoint``, ``backbone``
(spec), ``config``, ``command``, ``timings``, ``backbone_passes``. The top-level result is the
single-block probe; with ``--mode both`` the multiscale one is under ``multiscale`` (same keys);
with ``--mode multiscale`` alone it is the top level. ``--sweep-ckpts`` writes one such file per
checkpoint under ``DIR/<label>/`` and the joint table to ``DIR/sweep.{json,md}``. With
``--bootstrap`` > 0 (default) ``per_image_counts.npz`` beside each ``results.json`` keeps the best
lr's per-image TP/FP/FN for paired comparisons (``python -m eval.compare A B``); both files carry
the same ``run_id``, which ``eval.compare`` checks.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from dino_skipless.cli import (
    ArgumentParser,
    add_backbone_args,
    add_synthetic_args,
    cli_main,
    flag,
    hold_out_dir,
    resolve_device,
)
from dino_skipless.fileio import command_line
from dino_skipless.ranges import AT_LEAST_1, NON_NEGATIVE, POSITIVE

from .linprobe_lib import (
    DATASETS,
    STAGE,
    backbone_entries,
    build_datasets,
    load_backbones,
    run_linprobe,
    synthetic_cpu_resolution,
    validate_all,
)
from .probe_lib import LinProbeConfig

# ------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    d = LinProbeConfig()
    p = ArgumentParser(
        prog="python -m eval.linprobe",
        description="Dense linear probing of frozen ViT patch features (paper Sec. 6.2.1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--root", default=None, help="dataset root (synthetic: its cache dir)")
    add_backbone_args(p)
    p.add_argument(
        "--sweep-ckpts",
        nargs="+",
        metavar="CKPT",
        default=None,
        help="evaluate several backbones into one table; 'random:VARIANT' = random init "
        "(--arch/--patch-size/--depth)",
    )
    p.add_argument(
        "--layers", type=flag(int), nargs="+", default=None, help="single probe (default: last)"
    )
    p.add_argument("--multiscale", action="store_true", help="probe --ms-layers concatenated")
    p.add_argument(
        "--ms-layers",
        type=flag(int),
        nargs="+",
        default=None,
        help="multiscale blocks (default: last 4)",
    )
    p.add_argument(
        "--mode",
        choices=("single", "multiscale", "both"),
        default=None,
        help="which probes (default: single; multiscale with --multiscale)",
    )
    p.add_argument(
        "--resolution",
        type=flag(int, AT_LEAST_1),
        default=None,
        help=f"input side (default {d.resolution}; --dataset synthetic on CPU: the scenes' side "
        "rounded up to the patch size)",
    )
    p.add_argument("--epochs", type=flag(int, AT_LEAST_1), default=d.epochs)
    p.add_argument("--lrs", type=flag(float, POSITIVE), nargs="+", default=list(d.lrs))
    p.add_argument("--batch-size", type=flag(int, AT_LEAST_1), default=d.batch_size)
    p.add_argument(
        "--train-subset",
        type=flag(int, NON_NEGATIVE),
        default=d.train_subset,
        help="ADE20K/COCO-Stuff training images (seeded subset; 0 = all; VOC uses all)",
    )
    p.add_argument("--subset-seed", type=flag(int, NON_NEGATIVE), default=d.subset_seed)
    p.add_argument(
        "--bootstrap",
        type=flag(int, NON_NEGATIVE),
        default=d.bootstrap,
        help="resamples of the validation images for the mIoU standard error (0 = none)",
    )
    p.add_argument(
        "--max-unknown-label-fraction",
        type=float,
        default=d.max_unknown_label_fraction,
        help="refuse a split whose mask pixels outside the label set exceed this fraction",
    )
    p.add_argument("--voc-train-split", default=d.voc_train_split, choices=("train", "trainaug"))
    p.add_argument(
        "--voc-train-subset",
        type=flag(int, AT_LEAST_1),
        default=None,
        help="VOC: a seeded subset of this many training images (default: the whole split)",
    )
    p.add_argument("--no-standardize", action="store_true", help="skip per-channel standardisation")
    p.add_argument("--extract-batch-size", type=flag(int, AT_LEAST_1), default=d.extract_batch_size)
    p.add_argument("--num-workers", type=flag(int, NON_NEGATIVE), default=d.num_workers)
    p.add_argument("--cache-dir", default=None, help="keep feature caches on disk (memmap) here")
    add_synthetic_args(p, n=40, size=128)
    p.add_argument("--out", default="runs/linprobe", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args) -> tuple[LinProbeConfig, tuple[str, ...]]:
    d = LinProbeConfig()
    mode = args.mode or ("multiscale" if args.multiscale else "single")
    modes = ("single", "multiscale") if mode == "both" else (mode,)
    cfg = replace(
        LinProbeConfig(),
        resolution=args.resolution or d.resolution,
        epochs=args.epochs,
        lrs=tuple(args.lrs),
        batch_size=args.batch_size,
        layers=tuple(args.layers) if args.layers else None,
        ms_layers=tuple(args.ms_layers) if args.ms_layers else None,
        train_subset=args.train_subset if args.train_subset and args.train_subset > 0 else None,
        subset_seed=args.subset_seed,
        bootstrap=max(0, args.bootstrap),
        max_unknown_label_fraction=args.max_unknown_label_fraction,
        voc_train_split=args.voc_train_split,
        voc_train_subset=args.voc_train_subset if args.voc_train_subset else None,
        standardize=not args.no_standardize,
        seed=args.seed,
        extract_batch_size=args.extract_batch_size,
        num_workers=args.num_workers,
    )
    return cfg, modes


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg, modes = config_from_args(args)
    device = resolve_device(args.device)
    entries = backbone_entries(args.ckpt, args.random_init, args.sweep_ckpts)
    hold_out_dir(args.out, STAGE, report="sweep.json" if len(entries) > 1 else "results.json")
    backbones = load_backbones(
        entries, args.arch, args.seed, args.patch_size, args.depth, args.trust_checkpoint,
        args.ckpt_variant,
    )  # fmt: skip
    if args.resolution is None and args.dataset == "synthetic" and device.type == "cpu":
        cfg = synthetic_cpu_resolution(cfg, backbones[0][1].patch_size, args.synthetic_size)
    validate_all(backbones, cfg, modes)
    synthetic = dict(n=args.synthetic_n, size=args.synthetic_size, seed=args.synthetic_seed)
    train_ds, val_ds, subset, root = build_datasets(args.dataset, args.root, cfg, synthetic)
    cfg = replace(cfg, train_subset=subset)
    table = run_linprobe(
        backbones, train_ds, val_ds, cfg, modes, device, args.out,
        dataset=args.dataset, root=root, subset=subset, cache_dir=args.cache_dir,
        command=command_line() if argv is None else " ".join(["eval.linprobe", *argv]),
        progress=not args.quiet,
    )  # fmt: skip
    print(table)
    print(f"\nwrote {Path(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
