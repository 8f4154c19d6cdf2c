"""TokenCut object discovery and CorLoc as a library (paper Sec. 6.2.2): which images, batched
forward passes, one cut per block, and the ``results.json`` record of ``python -m tokencut.run``.

Each image is read at its own size, ImageNet-normalised, zero-padded bottom/right to a multiple
of the patch size (padding after normalisation, as the official code); images with the same
padded size are batched, and one forward pass yields the features of every requested block.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.functional import to_tensor
from tqdm import tqdm

from dino_skipless.data import build_detection_dataset, synthetic_root
from dino_skipless.data.files import read_image
from dino_skipless.digest import digest_of, files_digest
from dino_skipless.features import check_layers, extract, normalize_image, patch_size
from dino_skipless.fileio import markdown_table

from .corloc import box_iou, corloc
from .ncut import TokenCutConfig, tokencut_batch
from .vis import save_tokencut_vis

STAGE = "tokencut.run"  # the stage that writes these results (dino_skipless.outdir)
DATASETS = ("voc07", "voc12", "coco20k", "synthetic")
SKIP_REASONS = ("too_small", "no_gt", "no_hard_dropped")
TABLE_HEADERS = ["dataset", "ckpt", "layer", "feature", "CorLoc", "n_images", "n_skipped"]


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


def load_dataset(dataset: str, root=None, synthetic: dict | None = None):
    """(detection dataset, its root). ``synthetic``: ``synthetic_root`` kwargs (``n``, ``size``,
    ``seed``, ``vary``) for ``dataset == "synthetic"``, whose ``root`` is the cache folder."""
    if dataset == "synthetic":
        root = synthetic_root("voc", cache_dir=root, **(synthetic or {}))
        return build_detection_dataset("voc12", root), root
    if root is None:
        raise SystemExit(f"--dataset {dataset} needs --root (the dataset folder)")
    # Hard boxes are filtered here rather than by the reader so the dropped images are counted.
    return build_detection_dataset(dataset, root, no_hard=False), Path(root)


def image_hw(ds, i: int) -> tuple[int, int]:
    rec = ds.records[i]
    if rec.size is not None:
        return int(rec.size[1]), int(rec.size[0])
    # the header only; a missing, undecodable or oversized file is a DatasetError naming it
    return read_image(ds.image_path(i), lambda im: (im.height, im.width))


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
    fallback: bool = False  # the Lanczos solve was handed to the dense one (ncut.NCutResult)


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
                    r.box,
                    float(iou.max()),
                    r.degenerate,
                    r.mask if k in keep_masks else None,
                    r.fallback,
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


def stage_layers(model, layer: int, sweep: bool) -> list[int]:
    """Blocks to evaluate: every block with ``sweep``, else ``layer`` (validated, -1 = last)."""
    try:
        one = check_layers(model, [layer])[0]
    except ValueError as e:
        raise SystemExit(f"--layer: {e}") from None
    return list(range(len(model.blocks))) if sweep else [one]


def discover(
    model,
    ds,
    cfg: TokenCutConfig,
    layers: list[int],
    device: torch.device,
    *,
    max_images: int | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    vis_max: int | None = None,
    progress: bool = True,
    where: str = "the dataset",
) -> tuple[Plan, dict[int, list[Prediction]], float]:
    """(plan, predictions per block, seconds) for the first ``max_images`` images of ``ds``.
    With ``vis_max`` the masks of the first ``vis_count(n, vis_max)`` images are kept for
    ``save_visualisations``."""
    plan = plan_images(ds, patch_size(model), cfg.no_hard, cfg.min_grid, max_images)
    if not plan.items:
        raise SystemExit(
            f"no image left to evaluate in {where} "
            f"({len(plan.skipped)} skipped: see the reasons with --max-images)"
        )
    n_vis = 0 if vis_max is None else vis_count(len(plan.items), vis_max)
    t0 = time.perf_counter()
    preds = run_tokencut(
        model,
        ds,
        plan.items,
        layers,
        cfg,
        device,
        batch_size=batch_size,
        num_workers=num_workers,
        keep_masks=set(range(n_vis)),
        progress=progress,
    )
    return plan, preds, time.perf_counter() - t0


def data_digest(ds, items: list[Item]) -> dict[str, str]:
    """``{"images", "ground_truth"}``: content digests of the evaluated images' files (the
    decoded pixels for a reader without files) and of their ground truth as scored (id, size,
    boxes), in order; ``tokencut.compare`` pairs only runs whose digests agree."""
    gt = (
        it.image_id.encode()
        + np.asarray(it.hw, np.int64).tobytes()
        + np.asarray(it.gt, np.float64).tobytes()
        for it in items
    )
    if hasattr(ds, "image_path"):
        images = files_digest(ds.image_path(it.index) for it in items)
    else:
        images = digest_of(np.asarray(ds.load(it.index)).tobytes() for it in items)
    return {"images": images, "ground_truth": digest_of(gt)}


def vis_count(n_items: int, vis_max: int) -> int:
    """Images visualised: the first ``vis_max`` (all when ``vis_max <= 0``)."""
    return n_items if vis_max <= 0 else min(vis_max, n_items)


def results_record(
    plan: Plan,
    preds: dict[int, list[Prediction]],
    cfg: TokenCutConfig,
    seconds: float,
    *,
    sweep: bool,
    run_id: str,
    dataset: str,
    root,
    label: str,
    spec,
    command: str,
    digest: dict | None = None,
) -> dict:
    """``results.json``: CorLoc of the shown block (the best with ``sweep``, else the only one),
    per-block CorLoc and degenerate counts, skipped images with reasons, per-image boxes, and
    the ``data_digest`` of the images and ground truth (``digest``)."""
    layers = list(preds)
    per_layer, best = summarise(preds, cfg)
    shown = best if sweep else layers[0]
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
    if sweep:
        for k, e in enumerate(per_image):
            e["best_iou_per_layer"] = {str(li): preds[li][k].best_iou for li in layers}
    results = {
        "stage": STAGE,
        "run_id": run_id,
        "dataset": dataset,
        "root": str(root),
        "ckpt": label,
        "backbone": spec.to_dict(),
        "config": {**asdict(cfg), "eig_dtype": str(cfg.eig_dtype).replace("torch.", "")},
        "command": command,
        "corloc": per_layer[shown],
        "layer": shown,
        "feature": cfg.feature,
        "n_images": len(plan.items),
        "n_correct": int(sum(e["correct"] for e in per_image)),
        "n_skipped": len(plan.skipped),
        "skipped": {r: plan.count(r) for r in SKIP_REASONS},
        "skipped_images": plan.skipped,
        "n_degenerate": int(sum(pr.degenerate for pr in ps)),
        "n_degenerate_per_layer": {
            str(li): int(sum(pr.degenerate for pr in preds[li])) for li in layers
        },
        # graphs whose Lanczos solve was handed to the dense solver (same box; only slower)
        "n_solver_fallback_per_layer": {
            str(li): int(sum(pr.fallback for pr in preds[li])) for li in layers
        },
        "per_layer": {str(li): v for li, v in per_layer.items()},
        # a single block: per_layer has one entry and best_layer is that block
        "best_layer": best if sweep else shown,
        "seconds": seconds,
        "ms_per_image": 1000 * seconds / len(plan.items),
        "data_digest": digest,
        "per_image": per_image,
    }
    return results


def report_text(results: dict, sweep: bool, device) -> str:
    """The printed table (one row per block) and the note on skipped and degenerate images."""
    rows = [
        [
            results["dataset"],
            results["ckpt"],
            f"{li} (best)" if sweep and int(li) == results["best_layer"] else li,
            results["feature"],
            v,
            results["n_images"],
            results["n_skipped"],
            results["n_degenerate_per_layer"][li],
        ]
        for li, v in results["per_layer"].items()
    ]
    # per block: one block's graphs can all be degenerate while another's are fine
    table = markdown_table([*TABLE_HEADERS, "degenerate"], rows)
    note = (
        f"\nskipped: {results['skipped']}; degenerate: graphs of the block that are all one "
        f"component (whole image predicted); {results['ms_per_image']:.1f} ms/image on {device}\n"
    )
    return table + "\n" + note


def save_visualisations(vis_dir, ds, plan: Plan, preds: list[Prediction], n_vis: int, patch: int):
    """PNGs of the first ``n_vis`` images: mask, predicted and ground-truth boxes."""
    vis_dir = Path(vis_dir)
    for k in range(n_vis):
        it, pr = plan.items[k], preds[k]
        save_tokencut_vis(
            vis_dir / f"{it.image_id}.png", ds.load(it.index), pr.box, it.gt, pr.mask, patch
        )
