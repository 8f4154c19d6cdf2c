"""DINO's weighted k-NN classifier on frozen CLS features (Caron et al. 2021, ``eval_knn.py``).

    python -m eval.knn --root IMAGENET_LIKE (train/ and val/ ImageFolders) --ckpt ck.pt
    python -m eval.knn --dataset synthetic --random-init skipless_init --arch vit_mini
    python -m eval.knn --dataset photos --synthetic-n 1000 --synthetic-size 96 --ckpt RUN

Features: the CLS token after the final norm (``model(x)``), L2-normalised; images resized
(bicubic, short side 256) and centre-cropped to 224, ImageNet-normalised. Each test image takes
the k most cosine-similar training images; neighbour j votes for its class with weight
``exp(sim_j / T)``; the classes are ranked by summed votes (top-1 / top-5). Defaults k=20,
T=0.07 (DINO). Nearest neighbours by faiss when importable (a GPU index on CUDA), else torch.
A root without ``train/`` and ``val/`` is split per class, deterministically (``val_fraction``).

``--pixels S`` replaces the backbone by the raw-pixel baseline: the same resized, cropped,
normalised image, area-downsampled to S x S and flattened (3 S^2 dimensions), then the same
cosine k-NN. ``results.json`` keeps each validation image's top-1 hit (``val_correct``) and
digests of the validation labels and image files, so two runs can be paired image by image
(``paired_knn``: exact McNemar test), and runs on other images are refused.
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
    backbone_from_args,
    cli_main,
    flag,
    hold_out_dir,
    resolve_device,
)
from dino_skipless.features import check_input_size
from dino_skipless.fileio import command_line, new_run_id, write_report
from dino_skipless.ranges import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range

# The library's public names stay importable from here (scripts and tests use eval.knn).
from .knn_lib import (  # noqa: F401
    STAGE,
    KNNConfig,
    PixelBaseline,
    build_splits,
    eval_transform,
    extract_cls,
    faiss_available,
    knn_record,
    knn_root,
    knn_scores,
    knn_table,
    knn_vote,
    labels_digest,
    paired_knn,
    run_knn,
    search_faiss,
    search_torch,
    split_indices,
    top1_se,
    topk_accuracy,
)

# ---------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = KNNConfig()
    p = ArgumentParser(
        prog="python -m eval.knn",
        description="DINO weighted k-NN classification on frozen CLS features.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--root", default=None, help="ImageFolder root (train/ + val/, or one folder)")
    p.add_argument(
        "--dataset", choices=("imagefolder", "synthetic", "photos", "digits"), default="imagefolder",
        help="synthetic: the pattern classes; photos / digits: the real-image worlds of "
        "dino_skipless/data/worlds.py (sized by --synthetic-n/-size/-seed)",
    )  # fmt: skip
    add_backbone_args(p)
    p.add_argument(
        "--k", type=flag(int, AT_LEAST_1), nargs="+", default=list(d.k),
        help="neighbours (more than the training images: all of them, recorded as k_used)",
    )  # fmt: skip
    p.add_argument("--temperature", type=flag(float, POSITIVE), default=d.temperature)
    p.add_argument("--resize", type=flag(int, AT_LEAST_1), default=d.resize)
    p.add_argument("--crop", type=flag(int, AT_LEAST_1), default=d.crop)
    p.add_argument("--batch-size", type=flag(int, AT_LEAST_1), default=d.batch_size)
    p.add_argument("--val-fraction", type=flag(float, Range(gt=0, lt=1)), default=d.val_fraction)
    p.add_argument("--num-workers", type=flag(int, NON_NEGATIVE), default=d.num_workers)
    p.add_argument("--backend", choices=("auto", "faiss", "torch"), default="auto")
    add_synthetic_args(p, n=120, size=64)
    p.add_argument(
        "--pixels", type=flag(int, AT_LEAST_1), default=None, metavar="S",
        help="raw-pixel baseline instead of a backbone: images downsampled to S x S",
    )  # fmt: skip
    p.add_argument("--out", default="runs/knn")
    p.add_argument("--quiet", action="store_true")
    return p


def config_from_args(args) -> KNNConfig:
    return replace(
        KNNConfig(),
        k=tuple(args.k),
        temperature=args.temperature,
        resize=args.resize,
        crop=args.crop,
        batch_size=args.batch_size,
        val_fraction=args.val_fraction,
        split_seed=args.seed,
        num_workers=args.num_workers,
    )


def feature_model(args):
    """(model, spec, label): the raw-pixel baseline with ``--pixels``, else the backbone,
    checked against ``--crop``."""
    if args.pixels:
        return PixelBaseline(args.pixels), None, f"pixels-{args.pixels}"
    model, spec, label = backbone_from_args(args)
    try:
        check_input_size(model, args.crop, args.crop)
    except ValueError as e:
        raise SystemExit(f"{label}: {e} (--crop)") from None
    return model, spec, label


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    device = resolve_device(args.device)
    hold_out_dir(args.out, STAGE)
    model, spec, label = feature_model(args)
    synthetic = dict(n=args.synthetic_n, size=args.synthetic_size, seed=args.synthetic_seed)
    root = knn_root(args.dataset, args.root, synthetic)
    run = run_knn(model, root, cfg, device, args.backend, progress=not args.quiet)
    checkpoint = (
        {"pixels": args.pixels}
        if args.pixels
        else args.ckpt or {"random_init": args.random_init, "arch": args.arch}
    )
    record = knn_record(
        run, cfg, run_id=new_run_id(), root=root, label=label, checkpoint=checkpoint, spec=spec,
        device=device, command=command_line() if argv is None else " ".join(["eval.knn", *argv]),
    )  # fmt: skip
    table = knn_table(record)
    write_report(Path(args.out) / "results", record, table + "\n")
    print(table)
    print(f"\nwrote {Path(args.out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
