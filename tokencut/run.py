"""TokenCut object discovery and CorLoc (paper Sec. 6.2.2, Fig. 3, Table 4).

    python -m tokencut.run --dataset voc07 --root datasets/VOC2007 --ckpt run/backbone.pt
    python -m tokencut.run --dataset synthetic --random-init skipless_init --arch vit_small \\
        --sweep-layers --out runs/tokencut

Each image is read at its own size, ImageNet-normalised, zero-padded bottom/right to a multiple
of the patch size (padding after normalisation, as the official code); images with the same
padded size are batched, and with ``--sweep-layers`` one forward pass yields every block's
features. Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor
from tqdm import tqdm

from dino_skipless.cli import (
    add_backbone_args,
    backbone_from_args,
    cli_main,
    default_num_workers,
    resolve_device,
)
from dino_skipless.features import FEATURE_KINDS, check_layers, extract, normalize_image, patch_size
from dino_skipless.fileio import (
    atomic_write_text,
    command_line,
    markdown_table,
    new_run_id,
    write_json,
)

from .corloc import box_iou, corloc
from .ncut import SOLVERS, TokenCutConfig, tokencut_batch

DATASETS = ("voc07", "voc12", "coco20k", "synthetic")


@dataclass
class Item:
    """One image to run TokenCut on."""

    index: int  # index in the dataset
    image_id: str
    hw: tuple[int, int]  # original (H, W)
    gt: np.ndarray  # (K, 4) ground-truth boxes used for CorLoc


@dataclass
class Plan:
    items: list[Item]
    skipped: list[dict]  # {"image", "reason"}

    def count(self, reason: str) -> int:
        return sum(s["reason"] == reason for s in self.skipped)


def load_dataset(args):
    from dino_skipless.data import build_detection_dataset, synthetic_root

    if args.dataset == "synthetic":
        root = synthetic_root(
            "voc",
            n=args.synthetic_n,
            size=args.synthetic_size,
            seed=args.synthetic_seed,
            cache_dir=args.root,
            vary=args.synthetic_vary,
        )
        return build_detection_dataset("voc12", root), root
    if args.root is None:
        raise SystemExit(f"--dataset {args.dataset} needs --root (the dataset folder)")
    # Hard boxes are filtered here rather than by the reader so the dropped images are counted.
    return build_detection_dataset(args.dataset, args.root, no_hard=False), Path(args.root)


def image_hw(ds, i: int) -> tuple[int, int]:
    rec = ds.records[i]
    if rec.size is not None:
        return int(rec.size[1]), int(rec.size[0])
    with Image.open(ds.image_path(i)) as im:  # reads the header only
        return im.height, im.width


def plan_images(
    ds, patch: int, no_hard: bool, min_grid: int = 2, max_images: int | None = None
) -> Plan:
    """Which images TokenCut runs on, and why the others are left out (all counted):

    - ``no_hard_dropped``: with ``no_hard`` only non-hard boxes are ground truth and images left
      without one are dropped (official ``--no_hard``);
    - ``no_gt``: no ground-truth box at all (cannot be scored; the official code, which only
      drops these under ``--no_hard``, would count them as failures -- they do not occur in VOC);
    - ``too_small``: fewer than ``min_grid`` patch rows or columns after padding (no cut exists).
    """
    n = len(ds) if max_images is None else min(len(ds), max_images)
    items, skipped = [], []
    for i in range(n):
        t = ds.target(i)
        boxes = np.asarray(t["boxes"], dtype=np.float64).reshape(-1, 4)
        image_id = str(t["image_id"])
        if no_hard:
            boxes = boxes[~np.asarray(t["hard"], dtype=bool)]
            if len(boxes) == 0:
                skipped.append({"image": image_id, "reason": "no_hard_dropped"})
                continue
        if len(boxes) == 0:
            skipped.append({"image": image_id, "reason": "no_gt"})
            continue
        hw = image_hw(ds, i)
        if -(-hw[0] // patch) < min_grid or -(-hw[1] // patch) < min_grid:
            skipped.append({"image": image_id, "reason": "too_small", "size": list(hw)})
            continue
        items.append(Item(i, image_id, hw, boxes))
    return Plan(items, skipped)


def padded_hw(hw: tuple[int, int], patch: int) -> tuple[int, int]:
    return -(-hw[0] // patch) * patch, -(-hw[1] // patch) * patch


def bucket_batches(items: list[Item], patch: int, batch_size: int) -> list[list[int]]:
    """Positions in ``items`` grouped into batches of one padded size (sorted by size, stable)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, it in enumerate(items):
        groups.setdefault(padded_hw(it.hw, patch), []).append(k)
    out = []
    for key in sorted(groups):
        g = groups[key]
        out += [g[s : s + batch_size] for s in range(0, len(g), batch_size)]
    return out


class _Images(torch.utils.data.Dataset):
    """Normalised, zero-padded images (padding after normalisation, as the official code)."""

    def __init__(self, ds, items: list[Item], patch: int):
        self.ds, self.items, self.patch = ds, items, patch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        it = self.items[k]
        img = self.ds.load(it.index)
        x = normalize_image(to_tensor(img)[None])[0]
        if tuple(x.shape[-2:]) != it.hw:
            raise RuntimeError(f"{it.image_id}: image is {tuple(x.shape[-2:])}, expected {it.hw}")
        hp, wp = padded_hw(it.hw, self.patch)
        out = x.new_zeros(3, hp, wp)
        out[:, : it.hw[0], : it.hw[1]] = x
        return out, k


def _collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


@dataclass
class Prediction:
    box: list[float]
    best_iou: float
    degenerate: bool
    mask: np.ndarray | None = None  # kept only for visualised images


def run_tokencut(
    model,
    ds,
    items: list[Item],
    layers: list[int],
    cfg: TokenCutConfig,
    device: torch.device,
    batch_size: int = 16,
    num_workers: int = 0,
    keep_masks: set[int] | None = None,
    progress: bool = True,
) -> dict[int, list[Prediction]]:
    """TokenCut boxes of every item for every block in ``layers`` (one forward pass per batch)."""
    p = patch_size(model)
    keep_masks = keep_masks or set()
    batches = bucket_batches(items, p, batch_size)
    loader = torch.utils.data.DataLoader(
        _Images(ds, items, p),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    preds: dict[int, list[Prediction | None]] = {li: [None] * len(items) for li in layers}
    for x, ks in tqdm(loader, desc="tokencut", unit="batch", disable=not progress):
        x = x.to(device, non_blocking=True)
        feats = extract(model, x, layers, kind=cfg.feature)
        sizes = [items[k].hw for k in ks]
        for li in layers:
            res = tokencut_batch(feats.patches(li), feats.grid, p, sizes, cfg)
            for k, r in zip(ks, res):
                iou = box_iou(r.box, items[k].gt)
                preds[li][k] = Prediction(
                    r.box, float(iou.max()), r.degenerate, r.mask if k in keep_masks else None
                )
    return preds


def summarise(
    preds: dict[int, list[Prediction]], cfg: TokenCutConfig
) -> tuple[dict[int, float], int]:
    """(CorLoc per block, best block)."""
    per_layer = {
        li: corloc([p.best_iou for p in ps], cfg.iou_threshold) for li, ps in preds.items()
    }
    # First of the best on ties, so the choice is reproducible.
    best = max(per_layer, key=lambda li: (per_layer[li], -li))
    return per_layer, best


def build_parser() -> argparse.ArgumentParser:
    d = TokenCutConfig()
    p = argparse.ArgumentParser(
        prog="python -m tokencut.run",
        description="TokenCut unsupervised object discovery, CorLoc (paper Sec. 6.2.2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument(
        "--root", default=None, help="dataset root (synthetic: cache dir of generated scenes)"
    )
    add_backbone_args(p)
    p.add_argument("--layer", type=int, default=d.layer, help="block index (0-based; -1 = last)")
    p.add_argument("--sweep-layers", action="store_true", help="CorLoc of every block")
    p.add_argument("--feature", default=d.feature, choices=FEATURE_KINDS)
    p.add_argument("--tau", type=float, default=d.tau, help="affinity threshold")
    p.add_argument("--eps", type=float, default=d.eps, help="weight of non-edges")
    p.add_argument(
        "--no-binary-graph", action="store_true", help="ablation: keep similarities >= tau"
    )
    p.add_argument("--solver", default=d.solver, choices=SOLVERS)
    p.add_argument("--eig-dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--no-hard", action="store_true", help="drop difficult/truncated boxes")
    p.add_argument("--max-images", type=int, default=None, help="first N images only")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument(
        "--num-workers",
        type=int,
        default=default_num_workers(),
        help="image-loading workers (4, at most the CPU count)",
    )
    p.add_argument("--synthetic-n", type=int, default=40, help="--dataset synthetic: scenes")
    p.add_argument("--synthetic-size", type=int, default=128, help="--dataset synthetic: side")
    p.add_argument("--synthetic-seed", type=int, default=0, help="--dataset synthetic: seed")
    p.add_argument(
        "--synthetic-vary", action="store_true", help="--dataset synthetic: sides vary +-25%%"
    )
    p.add_argument("--out", default="runs/tokencut", help="output folder")
    p.add_argument("--save-vis", default=None, metavar="DIR", help="write PNGs of predictions")
    p.add_argument("--vis-max", type=int, default=50, help="images visualised (0 = all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args) -> TokenCutConfig:
    return replace(
        TokenCutConfig(),
        tau=args.tau,
        eps=args.eps,
        feature=args.feature,
        layer=args.layer,
        no_hard=args.no_hard,
        binary_graph=not args.no_binary_graph,
        solver=args.solver,
        eig_dtype=getattr(torch, args.eig_dtype),
    )


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    model, spec, label = backbone_from_args(args)
    model = model.to(device).eval()
    try:
        layer = check_layers(model, [cfg.layer])[0]
    except ValueError as e:
        raise SystemExit(f"--layer: {e}") from None
    layers = list(range(len(model.blocks))) if args.sweep_layers else [layer]
    ds, root = load_dataset(args)
    p = patch_size(model)
    plan = plan_images(ds, p, cfg.no_hard, cfg.min_grid, args.max_images)
    if not plan.items:
        raise SystemExit(
            f"no image left to evaluate in {args.dataset} at {root} "
            f"({len(plan.skipped)} skipped: see the reasons with --max-images)"
        )
    n_vis = 0
    if args.save_vis:
        n_vis = len(plan.items) if args.vis_max <= 0 else min(args.vis_max, len(plan.items))
    t0 = time.perf_counter()
    preds = run_tokencut(
        model,
        ds,
        plan.items,
        layers,
        cfg,
        device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        keep_masks=set(range(n_vis)),
        progress=not args.quiet,
    )
    elapsed = time.perf_counter() - t0
    per_layer, best = summarise(preds, cfg)
    shown = best if args.sweep_layers else layer
    ps = preds[shown]
    per_image = [
        {
            "image": it.image_id,
            "size": list(it.hw),
            "pred_box": pr.box,
            "best_iou": pr.best_iou,
            "correct": pr.best_iou >= cfg.iou_threshold,
            "degenerate": pr.degenerate,
            "gt_boxes": it.gt.tolist(),
        }
        for it, pr in zip(plan.items, ps)
    ]
    if args.sweep_layers:
        for k, e in enumerate(per_image):
            e["best_iou_per_layer"] = {str(li): preds[li][k].best_iou for li in layers}
    reasons = ("too_small", "no_gt", "no_hard_dropped")
    results = {
        "run_id": new_run_id(),
        "dataset": args.dataset,
        "root": str(root),
        "ckpt": label,
        "backbone": spec.to_dict(),
        "config": {**asdict(cfg), "eig_dtype": str(cfg.eig_dtype).replace("torch.", "")},
        "command": command_line(),
        "corloc": per_layer[shown],
        "layer": shown,
        "feature": cfg.feature,
        "n_images": len(plan.items),
        "n_correct": int(sum(e["correct"] for e in per_image)),
        "n_skipped": len(plan.skipped),
        "skipped": {r: plan.count(r) for r in reasons},
        "skipped_images": plan.skipped,
        "n_degenerate": int(sum(pr.degenerate for pr in ps)),
        "n_degenerate_per_layer": {
            str(li): int(sum(pr.degenerate for pr in preds[li])) for li in layers
        },
        "per_layer": {str(li): v for li, v in per_layer.items()},
        "best_layer": best,
        "seconds": elapsed,
        "ms_per_image": 1000 * elapsed / len(plan.items),
        "per_image": per_image,
    }
    if not args.sweep_layers:
        # A single block: per_layer has one entry and best_layer is that block.
        results["best_layer"] = layer
    out = Path(args.out)
    write_json(out / "results.json", results)
    rows = [
        [
            args.dataset,
            label,
            f"{li} (best)" if args.sweep_layers and li == best else str(li),
            cfg.feature,
            per_layer[li],
            len(plan.items),
            len(plan.skipped),
            results["n_degenerate_per_layer"][str(li)],
        ]
        for li in layers
    ]
    headers = ["dataset", "ckpt", "layer", "feature", "CorLoc", "n_images", "n_skipped"]
    # per block: one block's graphs can all be degenerate while another's are fine
    table = markdown_table([*headers, "degenerate"], rows)
    note = (
        f"\nskipped: {results['skipped']}; degenerate: graphs of the block that are all one "
        f"component (whole image predicted); {results['ms_per_image']:.1f} ms/image on {device}\n"
    )
    atomic_write_text(out / "results.md", table + "\n" + note)
    print(table + "\n" + note)
    if args.save_vis:
        from .vis import save_tokencut_vis

        vis_dir = Path(args.save_vis)
        for k in range(n_vis):
            it, pr = plan.items[k], ps[k]
            save_tokencut_vis(
                vis_dir / f"{it.image_id}.png", ds.load(it.index), pr.box, it.gt, pr.mask, p
            )
        print(f"wrote {n_vis} visualisations to {vis_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
