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
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .cli import add_backbone_args, backbones_from_args, cli_main, resolve_device
from .features import check_layers, extract, normalize_image, patch_size
from .figures import GridStyle, image_grid
from .fileio import command_line, write_json
from .pca_lib import (
    FIT_MODES,
    UPSAMPLE_MODES,
    PCAConfig,
    pca_rgb,
    resize_center_crop,
    single_thread,
    to_tensor01,
    upsample,
)

DATASETS = ("voc", "ade20k", "cocostuff", "coco20k", "synthetic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
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
    p.add_argument("--synthetic-size", type=int, default=None, help="default: --resolution")
    p.add_argument("--n", type=int, default=40, help="number of images/rows (paper: 40)")
    p.add_argument(
        "--layers", type=int, nargs="+", default=None, help="blocks, 0-based (default: last)"
    )
    p.add_argument("--resolution", type=int, default=224, help="short side resize + centre crop")
    p.add_argument("--fit", choices=FIT_MODES, default="joint")
    p.add_argument("--mask-background", action="store_true", help="DINOv2-style PC1 threshold")
    p.add_argument("--mask-threshold", type=float, default=PCAConfig.mask_threshold)
    p.add_argument("--background", choices=("black", "white"), default="black")
    p.add_argument("--upsample", choices=UPSAMPLE_MODES, default=PCAConfig.upsample)
    p.add_argument(
        "--no-norm",
        action="store_true",
        help="use raw block outputs (default: after the final LayerNorm, like DINO's "
        "get_intermediate_layers and DINOv2's x_norm_patchtokens)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="pca.png", help="figure path (.png, or .pdf for PDF only)")
    p.add_argument("--pdf", action="store_true", help="also write a PDF beside the PNG")
    p.add_argument("--dpi", type=int, default=GridStyle.dpi)
    p.add_argument("--save-npz", action="store_true", help="also save the RGB maps (OUT.npz)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    if args.resolution < 1:
        p.error("--resolution must be positive")
    if args.dataset and args.dataset != "synthetic" and not args.root:
        p.error(f"--dataset {args.dataset} needs --root PATH")
    return args


# ----------------------------------------------------------------------------- input checks


def list_image_files(folder: str | Path) -> list[Path]:
    """Top-level image files of ``folder``, sorted by name; fails if there are none."""
    d = Path(folder)
    if not d.is_dir():
        raise SystemExit(f"--images {folder}: not a folder")
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(
            f"--images {folder}: no image files at the top level (looked for "
            f"{', '.join(IMAGE_EXTENSIONS)}; subfolders are not searched)"
        )
    return files


def check_backbones(backbones, layers: list[int] | None, resolution: int) -> list[list[int]]:
    """Blocks per model; one patch size for all; resolution a multiple of it. Raises SystemExit."""
    sizes = {label: patch_size(m) for m, _, label in backbones}
    if len(set(sizes.values())) > 1:
        which = ", ".join(f"{lab}: {p}" for lab, p in sizes.items())
        raise SystemExit(
            f"the models in one figure must share a patch size (their grids must align); "
            f"got {which}"
        )
    p = next(iter(sizes.values()))
    if resolution % p:
        lo = max(p, resolution // p * p)
        raise SystemExit(
            f"--resolution {resolution} is not a multiple of the patch size {p}; "
            f"use e.g. {lo} or {lo + p}"
        )
    out = []
    for model, _, label in backbones:
        try:
            out.append(check_layers(model, layers if layers is not None else [-1]))
        except ValueError as e:
            raise SystemExit(f"--layers for {label}: {e}") from None
    return out


# ----------------------------------------------------------------------------- images


def load_images(args) -> list[tuple[str, object]]:
    """``[(name, PIL image)]``: the first ``--n`` readable images, in order."""
    from .data import DatasetError, build_detection_dataset, build_segmentation_dataset
    from .data.files import load_rgb

    if args.images:
        out, bad = [], []
        for f in list_image_files(args.images):
            if len(out) == args.n:
                break
            try:
                out.append((f.name, load_rgb(f)))
            except DatasetError as e:
                bad.append(str(e))
        if bad:
            print(f"skipped {len(bad)} unreadable file(s): {'; '.join(bad)}", file=sys.stderr)
        if not out:
            raise SystemExit(f"--images {args.images}: none of the image files could be read")
        return out
    name, root, split = args.dataset, args.root, args.split
    try:
        if name == "synthetic":
            from .data import synthetic_root

            size = args.synthetic_size or args.resolution
            # A quarter of synthetic VOC scenes are in 'val' (scene i with i % 4 == 1).
            root = synthetic_root("voc", n=4 * args.n + 4, size=size, seed=0, cache_dir=root)
            name = "voc"
        if name == "coco20k":
            ds = build_detection_dataset("coco20k", root)
            load = ds.load
        else:
            ds = build_segmentation_dataset(name, root, split)
            load = lambda i: ds.load(i)[0]  # noqa: E731
    except DatasetError as e:
        raise SystemExit(f"--dataset {args.dataset}: {e}") from None
    if len(ds) == 0:
        raise SystemExit(f"--dataset {args.dataset} ({split}) at {root}: no images")
    return [(ds.image_path(i).name, load(i)) for i in range(min(args.n, len(ds)))]


# ----------------------------------------------------------------------------- pipeline


def feature_maps(model, x01: torch.Tensor, layers, norm: bool, batch_size: int, device, desc):
    """{block: (B, h*w, D) patch features on CPU} and the patch grid."""
    model = model.to(device)
    chunks: dict[int, list[torch.Tensor]] = {li: [] for li in layers}
    grid = None
    for i in tqdm(range(0, len(x01), batch_size), desc=desc, leave=False, disable=None):
        x = normalize_image(x01[i : i + batch_size].to(device))
        f = extract(model, x, layers, norm=norm)
        grid = f.grid
        for li in layers:
            chunks[li].append(f.patches(li).float().cpu())
    return {li: torch.cat(c) for li, c in chunks.items()}, grid


def short_name(label: str, variant: str) -> str:
    if label.startswith("random-"):
        return "random init"
    suffix = f" ({variant})"
    name = label[: -len(suffix)] if label.endswith(suffix) else label
    return "" if name == variant else name  # the title already names the variant


def output_paths(out: str, pdf: bool) -> list[Path]:
    p = Path(out)
    if p.suffix.lower() == ".pdf":
        return [p]
    p = p if p.suffix else p.with_suffix(".png")
    return [p, p.with_suffix(".pdf")] if pdf else [p]


@cli_main
def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = PCAConfig(
        fit=args.fit,
        mask_background=args.mask_background,
        mask_threshold=args.mask_threshold,
        background=(1.0, 1.0, 1.0) if args.background == "white" else (0.0, 0.0, 0.0),
        upsample=args.upsample,
    )
    # Everything that can be wrong is checked before the first forward pass.
    if args.images:
        list_image_files(args.images)
    device = resolve_device(args.device)
    # Workaround (init/loading are lead-owned): the paper init's many small SVDs, which
    # load_backbone also runs before overwriting them, are 3-5x faster single-threaded on CPU.
    with single_thread():
        backbones = backbones_from_args(args)
    layers = check_backbones(backbones, args.layers, args.resolution)
    named = load_images(args)
    names = [n for n, _ in named]
    crops = [resize_center_crop(im, args.resolution) for _, im in named]
    x01 = to_tensor01(crops)
    res = (args.resolution, args.resolution)

    columns, panels, titles, subtitles, groups = [], [], [], [], []
    for g, ((model, spec, label), blocks) in enumerate(zip(backbones, layers)):
        feats, grid = feature_maps(
            model, x01, blocks, not args.no_norm, args.batch_size, device, label
        )
        model.cpu()
        for b in blocks:
            maps = pca_rgb(feats[b], grid, cfg)
            panels.append((upsample(maps.rgb, res, cfg.upsample), maps))
            titles.append(f"{spec.variant} · block {b}")
            subtitles.append(short_name(label, spec.variant))
            groups.append(g)
            columns.append(
                {
                    "label": label,
                    "variant": spec.variant,
                    "arch": spec.arch,
                    "block": b,
                    "explained_variance_ratio": maps.explained_variance_ratio,
                }
            )

    imgs = [np.asarray(c) for c in crops]
    cells = [[imgs[r]] + [rgb[r] for rgb, _ in panels] for r in range(len(imgs))]
    paths = output_paths(args.out, args.pdf)
    info = image_grid(
        cells,
        ["image"] + titles,
        paths,
        subtitles=[""] + subtitles,
        groups=[-1] + groups,
        style=GridStyle(dpi=args.dpi),
    )
    stem = paths[0].with_suffix("")
    if args.save_npz:
        np.savez_compressed(
            f"{stem}.npz",
            images=np.stack(imgs),
            rgb=np.stack([m.rgb for _, m in panels], 1),  # (N, columns, h, w, 3), patch scale
            titles=np.array(titles),
            **(
                {"foreground": np.stack([m.foreground for _, m in panels], 1)}
                if cfg.mask_background
                else {}
            ),
        )
    write_json(
        f"{stem}.json",
        {
            "command": command_line(),
            "images": names,
            "source": args.images or f"{args.dataset}:{args.split}",
            "resolution": args.resolution,
            "norm": not args.no_norm,
            "config": asdict(cfg),
            "columns": columns,
            "figure": asdict(info),
        },
    )
    print(
        f"wrote {', '.join(info.paths)}: {info.n_rows} rows x {info.n_cols} columns "
        f"({info.width_px}x{info.height_px} px)"
    )
    return info


if __name__ == "__main__":
    main()
