"""PCA-RGB figures of patch features (paper Sec. 6.3, Figs. 4, 7, 8).

    python -m dino_skipless.pca --ckpt runs/skip --ckpt runs/skipless_init \\
        --dataset cocostuff --root data/cocostuff --n 40 --layers 11 --out fig4.png
    python -m dino_skipless.pca --random-init skip --random-init skipless_init --arch vit_small \\
        --dataset synthetic --n 10 --layers 3 7 11 --out runs/pca.png --pdf

One row per image -- the first N in dataset order (or sorted file order for ``--images DIR``,
top-level files only), never chosen by hand -- then one column per (model, block). PCA is fitted
per (model, block) over the patches of all shown images (``--fit per-image`` for one fit per
picture); never across models. Colour, sign, mask and upsampling conventions: ``pca_lib``.
Also writes ``OUT.json`` (images, columns, explained variance) beside the figure.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch

from .cli import (
    ArgumentParser,
    add_backbone_args,
    backbones_from_args,
    cli_main,
    flag,
    hold_out_dir,
    resolve_device,
)
from .figures import GridStyle
from .fileio import command_line, write_report
from .pca_figure import (
    check_backbones,
    columns_table,
    list_image_files,
    load_images,
    output_paths,
    pca_figure,
)
from .pca_lib import FIT_MODES, UPSAMPLE_MODES, PCAConfig, single_thread
from .ranges import AT_LEAST_1

DATASETS = ("voc", "ade20k", "cocostuff", "coco20k", "synthetic")
STAGE = "dino_skipless.pca"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m dino_skipless.pca",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_backbone_args(p, multiple=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images (top level, sorted)")
    src.add_argument("--dataset", choices=DATASETS, help="read the first N images of a dataset")
    p.add_argument("--root", help="dataset root (synthetic: cache dir, default ~/.cache)")
    p.add_argument("--split", default="val", help="dataset split (default val)")
    p.add_argument(
        "--synthetic-size", type=flag(int, AT_LEAST_1), default=None, help="default: --resolution"
    )
    p.add_argument(
        "--n", type=flag(int, AT_LEAST_1), default=40, help="number of images/rows (paper: 40)"
    )
    p.add_argument(
        "--layers", type=flag(int), nargs="+", default=None, help="blocks, 0-based (default: last)"
    )
    p.add_argument(
        "--resolution", type=flag(int, AT_LEAST_1), default=224, help="short side resize + centre "
        "crop"
    )  # fmt: skip
    p.add_argument("--fit", choices=FIT_MODES, default="joint")
    p.add_argument("--mask-background", action="store_true", help="DINOv2-style PC1 threshold")
    p.add_argument("--mask-threshold", type=flag(float), default=PCAConfig.mask_threshold)
    p.add_argument("--background", choices=("black", "white"), default="black")
    p.add_argument("--upsample", choices=UPSAMPLE_MODES, default=PCAConfig.upsample)
    p.add_argument(
        "--no-norm",
        action="store_true",
        help="use raw block outputs (default: after the final LayerNorm, like DINO's "
        "get_intermediate_layers and DINOv2's x_norm_patchtokens)",
    )
    p.add_argument("--batch-size", type=flag(int, AT_LEAST_1), default=16)
    p.add_argument("--out", default="pca.png", help="figure path (.png, or .pdf for PDF only)")
    p.add_argument("--pdf", action="store_true", help="also write a PDF beside the PNG")
    p.add_argument("--dpi", type=flag(int, AT_LEAST_1), default=GridStyle.dpi)
    p.add_argument("--save-npz", action="store_true", help="also save the RGB maps (OUT.npz)")
    args = p.parse_args(argv)
    if args.dataset and args.dataset != "synthetic" and not args.root:
        p.error(f"--dataset {args.dataset} needs --root PATH")
    return args


def config_from_args(args) -> PCAConfig:
    return PCAConfig(
        fit=args.fit,
        mask_background=args.mask_background,
        mask_threshold=args.mask_threshold,
        background=(1.0, 1.0, 1.0) if args.background == "white" else (0.0, 0.0, 0.0),
        upsample=args.upsample,
    )


@cli_main
def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = config_from_args(args)
    # Everything that can be wrong is checked before the first forward pass.
    if args.images:
        list_image_files(args.images)
    device = resolve_device(args.device)
    paths = output_paths(args.out, args.pdf)
    # the figure's folder, locked per figure name (two figures may share a folder)
    hold_out_dir(
        paths[0].parent, STAGE, report=paths[0].with_suffix(".json").name,
        lock_name=f".{paths[0].stem}.skipless.lock",
    )  # fmt: skip
    # Workaround (init/loading are lead-owned): the paper init's many small SVDs, which
    # load_backbone also runs before overwriting them, are 3-5x faster single-threaded on CPU.
    with single_thread():
        backbones = backbones_from_args(args)
    layers = check_backbones(backbones, args.layers, args.resolution)
    named = load_images(
        args.n, args.images, args.dataset, args.root, args.split,
        args.synthetic_size or args.resolution,
    )  # fmt: skip
    fig = pca_figure(
        backbones, layers, named, cfg, paths, resolution=args.resolution, norm=not args.no_norm,
        batch_size=args.batch_size, device=device, dpi=args.dpi, save_npz=args.save_npz,
    )  # fmt: skip
    record = {
        "stage": STAGE,
        "command": command_line(),
        "images": fig.names,
        "source": args.images or f"{args.dataset}:{args.split}",
        "resolution": args.resolution,
        "norm": not args.no_norm,
        "config": asdict(cfg),
        "columns": fig.columns,
        "figure": asdict(fig.info),
    }
    write_report(paths[0].with_suffix(""), record, columns_table(fig.columns) + "\n")
    info = fig.info
    print(
        f"wrote {', '.join(info.paths)}: {info.n_rows} rows x {info.n_cols} columns "
        f"({info.width_px}x{info.height_px} px)"
    )
    return info


if __name__ == "__main__":
    main()
