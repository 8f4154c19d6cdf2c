"""The PCA-RGB figure stage as a library (paper Sec. 6.3, Figs. 4, 7, 8): input images, the
backbones' checks, patch feature maps, the grid of PCA pictures and its JSON record. The PCA
conventions are in ``pca_lib``; the command line is ``python -m dino_skipless.pca``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import DatasetError, build_detection_dataset, build_segmentation_dataset, synthetic_root
from .data.files import load_rgb
from .features import check_layers, extract, normalize_image, patch_size
from .figures import GridInfo, GridStyle, image_grid
from .fileio import markdown_table
from .pca_lib import PCAConfig, pca_rgb, resize_center_crop, to_tensor01, upsample

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


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


def load_images(
    n: int,
    images: str | Path | None = None,
    dataset: str | None = None,
    root=None,
    split: str = "val",
    synthetic_size: int | None = None,
) -> list[tuple[str, object]]:
    """``[(name, PIL image)]``: the first ``n`` readable images of the folder ``images``, or of
    ``dataset`` (synthetic: VOC-format scenes of side ``synthetic_size``, cached in ``root``)."""
    if images:
        out, bad = [], []
        for f in list_image_files(images):
            if len(out) == n:
                break
            try:
                out.append((f.name, load_rgb(f)))
            except DatasetError as e:
                bad.append(str(e))
        if bad:
            print(f"skipped {len(bad)} unreadable file(s): {'; '.join(bad)}", file=sys.stderr)
        if not out:
            raise SystemExit(f"--images {images}: none of the image files could be read")
        return out
    name = dataset
    try:
        if name == "synthetic":
            # A quarter of synthetic VOC scenes are in 'val' (scene i with i % 4 == 1).
            root = synthetic_root("voc", n=4 * n + 4, size=synthetic_size, seed=0, cache_dir=root)
            name = "voc"
        if name == "coco20k":
            ds = build_detection_dataset("coco20k", root)
            load = ds.load
        else:
            ds = build_segmentation_dataset(name, root, split)
            load = lambda i: ds.load(i)[0]  # noqa: E731
    except DatasetError as e:
        raise SystemExit(f"--dataset {dataset}: {e}") from None
    if len(ds) == 0:
        raise SystemExit(f"--dataset {dataset} ({split}) at {root}: no images")
    return [(ds.image_path(i).name, load(i)) for i in range(min(n, len(ds)))]


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


@dataclass
class PCAFigure:
    info: GridInfo
    names: list[str]  # the images, one per row
    columns: list[dict]  # one per (model, block): label, variant, arch, block, explained variance


def pca_figure(
    backbones,
    layers: list[list[int]],
    named: list[tuple[str, object]],
    cfg: PCAConfig,
    paths: list[Path],
    *,
    resolution: int,
    norm: bool = True,
    batch_size: int = 16,
    device="cpu",
    dpi: int = GridStyle.dpi,
    save_npz: bool = False,
) -> PCAFigure:
    """One row per image, then one column per (model, block) of ``layers``; written to
    ``paths`` (and the RGB maps to ``STEM.npz`` with ``save_npz``)."""
    names = [n for n, _ in named]
    crops = [resize_center_crop(im, resolution) for _, im in named]
    x01 = to_tensor01(crops)
    res = (resolution, resolution)

    columns, panels, titles, subtitles, groups = [], [], [], [], []
    for g, ((model, spec, label), blocks) in enumerate(zip(backbones, layers)):
        feats, grid = feature_maps(model, x01, blocks, norm, batch_size, device, label)
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
    info = image_grid(
        cells,
        ["image"] + titles,
        paths,
        subtitles=[""] + subtitles,
        groups=[-1] + groups,
        style=GridStyle(dpi=dpi),
    )
    if save_npz:
        np.savez_compressed(
            f"{paths[0].with_suffix('')}.npz",
            images=np.stack(imgs),
            rgb=np.stack([m.rgb for _, m in panels], 1),  # (N, columns, h, w, 3), patch scale
            titles=np.array(titles),
            **(
                {"foreground": np.stack([m.foreground for _, m in panels], 1)}
                if cfg.mask_background
                else {}
            ),
        )
    return PCAFigure(info, names, columns)


def columns_table(columns: list[dict]) -> str:
    """One row per column of the figure: its model, block and the first fit's explained
    variance ratios."""
    rows = [
        [
            c["label"],
            c["block"],
            ", ".join(f"{v:.3f}" for v in c["explained_variance_ratio"][0]),
        ]
        for c in columns
    ]
    return markdown_table(["model", "block", "explained variance (first fit)"], rows)
