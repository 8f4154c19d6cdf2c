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
import hashlib
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dino_skipless.cli import add_backbone_args, cli_main, label_for, resolve_device
from dino_skipless.features import check_input_size, check_layers, extract
from dino_skipless.fileio import (
    atomic_write_text,
    command_line,
    markdown_table,
    new_run_id,
    write_json,
)
from dino_skipless.models import build_model, load_backbone

from .feature_cache import build_cache
from .probe_lib import LinProbeConfig, default_layers, probe_from_cache

DATASETS = ("voc", "ade20k", "cocostuff", "cocostuff27", "synthetic")
SUBSET_DATASETS = ("ade20k", "cocostuff", "cocostuff27")  # paper: 3,000 training images
COUNTS = "per_image_counts.npz"
TABLE_HEADERS = ["dataset", "ckpt", "probe", "layers", "best lr", "mIoU", "± s.e.", "pAcc"]


# ------------------------------------------------------------------------------------ datasets


def build_datasets(dataset: str, root, cfg: LinProbeConfig, synthetic: dict | None = None):
    """(train, val, effective train subset). ``synthetic``: synthetic_root kwargs."""
    from dino_skipless.data import build_segmentation_dataset, synthetic_root

    name = dataset.lower()
    if name == "synthetic":
        kw = dict(synthetic or {})
        root = synthetic_root("voc", cache_dir=root, **kw)
        name = "voc"
    if root is None:
        raise SystemExit(f"--dataset {dataset} needs --root PATH")
    subset = cfg.train_subset if name in SUBSET_DATASETS else None
    split = cfg.voc_train_split if name == "voc" else "train"
    train = build_segmentation_dataset(
        name, root, split, subset=subset, subset_seed=cfg.subset_seed
    )
    val = build_segmentation_dataset(name, root, "val")
    return train, val, subset, Path(root)


# ------------------------------------------------------------------------------------ pipeline


def resolve_probe_layers(model, cfg: LinProbeConfig, modes) -> dict[str, list[int]]:
    """Blocks of each requested probe, validated against the backbone (fails with the range)."""
    single, multi = default_layers(len(model.blocks))
    out = {}
    if "single" in modes:
        out["single"] = check_layers(model, cfg.layers if cfg.layers else single)
    if "multiscale" in modes:
        out["multiscale"] = check_layers(model, cfg.ms_layers if cfg.ms_layers else multi)
    return out


def validate(model, cfg: LinProbeConfig, modes) -> dict[str, list[int]]:
    """Everything that can be wrong with the backbone/flags, before any work."""
    layers = resolve_probe_layers(model, cfg, modes)
    check_input_size(model, cfg.resolution, cfg.resolution)
    return layers


def probe_backbone(
    model,
    train_ds,
    val_ds,
    cfg: LinProbeConfig,
    modes=("single",),
    device="cpu",
    cache_dir=None,
    key_parts: dict | None = None,
    extractor=extract,
    progress: bool = True,
    on_probe=None,
) -> dict:
    """Extract once (union of the probes' blocks), then run each probe from the same cache.

    ``on_probe(partial)``: called after each probe but the last with the run so far (same
    layout as the return value), so a long ``--mode both`` run keeps its finished probe."""
    layers = validate(model, cfg, modes)
    union = sorted({la for ls in layers.values() for la in ls})
    device = torch.device(device)
    t0 = time.perf_counter()
    kp = dict(key_parts or {})
    common = dict(
        batch_size=cfg.extract_batch_size,
        num_workers=cfg.num_workers,
        device=device,
        cache_dir=cache_dir,
        extractor=extractor,
        progress=progress,
    )
    tr = build_cache(
        model,
        train_ds,
        union,
        cfg.resolution,
        train=True,
        key_parts={**kp, "split": "train"},
        desc="train features",
        **common,
    )
    va = build_cache(
        model,
        val_ds,
        union,
        cfg.resolution,
        train=False,
        key_parts={**kp, "split": "val"},
        desc="val features",
        **common,
    )
    t1 = time.perf_counter()
    stats: dict = {}
    results = {}
    probe_s = {}

    def run_so_far() -> dict:
        return {
            "results": dict(results),
            "timings": {
                "features_s": t1 - t0,
                "probe_s": dict(probe_s),
                "total_s": time.perf_counter() - t0,
            },
            "backbone_passes": {"train": tr.passes, "val": va.passes},
            "n_train": len(tr),
            "n_val": len(va),
            "cached_layers": union,
            "grid": list(tr.grid),
            "val_digest": masks_digest(va.masks),
        }

    for i, (mode, ls) in enumerate(layers.items()):
        tm = time.perf_counter()
        results[mode] = probe_from_cache(
            tr, va, ls, train_ds.num_classes, train_ds.class_names, cfg, device, stats, progress
        )
        probe_s[mode] = time.perf_counter() - tm
        if on_probe is not None and i < len(layers) - 1:
            on_probe(run_so_far())
    return run_so_far()


def masks_digest(masks) -> str:
    """Fingerprint of the validation targets (order included): paired comparisons need both
    runs to have scored the same images at the same label resolution."""
    h = hashlib.sha1()
    for m in masks:
        m = np.ascontiguousarray(np.asarray(m, dtype=np.uint8))
        h.update(np.asarray(m.shape, dtype=np.int64).tobytes())
        h.update(m.tobytes())
    return h.hexdigest()


def save_counts(folder: Path, run: dict, run_id: str) -> None:
    """Move the per-image counts out of ``run`` (they are not JSON) into
    ``folder/per_image_counts.npz``: one ``(N_val, C, 3)`` array per probe, plus the digest and
    the run id that ``results.json`` carries too. Without counts (``--bootstrap 0``) an older
    run's file is removed, so the folder never pairs this run's results with another's counts."""
    arrays = {
        mode: np.asarray(r.pop("per_image_counts"), dtype=np.int64)
        for mode, r in run["results"].items()
        if "per_image_counts" in r
    }
    path = folder / COUNTS
    if not arrays:
        path.unlink(missing_ok=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".per_image_counts.tmp.npz"
    np.savez_compressed(
        tmp, val_digest=np.array(run["val_digest"]), run_id=np.array(run_id), **arrays
    )
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ outputs


def assemble(run: dict, modes, meta: dict) -> dict:
    """results.json layout (see module docstring)."""
    res = run["results"]
    top = res["single"] if "single" in res else res["multiscale"]
    out = {"probe": "single" if "single" in res else "multiscale", **top}
    if "single" in res and "multiscale" in res:
        out["multiscale"] = res["multiscale"]
    out.update(meta)
    out.update({k: v for k, v in run.items() if k != "results"})
    return out


def table_rows(dataset: str, label: str, run: dict) -> list[list]:
    rows = []
    for mode, r in run["results"].items():
        layers = ",".join(str(x) for x in r["layers"])
        se = r.get("miou_se", float("nan"))
        rows.append([dataset, label, mode, layers, r["best_lr"], r["miou"], se, r["pacc"]])
    return rows


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "ckpt"


# ------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    d = LinProbeConfig()
    p = argparse.ArgumentParser(
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
        "--layers", type=int, nargs="+", default=None, help="single probe (default: last)"
    )
    p.add_argument("--multiscale", action="store_true", help="probe --ms-layers concatenated")
    p.add_argument(
        "--ms-layers", type=int, nargs="+", default=None, help="multiscale blocks (default: last 4)"
    )
    p.add_argument(
        "--mode",
        choices=("single", "multiscale", "both"),
        default=None,
        help="which probes (default: single; multiscale with --multiscale)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help=f"input side (default {d.resolution}; --dataset synthetic on CPU: the scenes' side "
        "rounded up to the patch size)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lrs", type=float, nargs="+", default=list(d.lrs))
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--train-subset",
        type=int,
        default=d.train_subset,
        help="ADE20K/COCO-Stuff training images (seeded subset; 0 = all; VOC uses all)",
    )
    p.add_argument("--subset-seed", type=int, default=d.subset_seed)
    p.add_argument(
        "--bootstrap",
        type=int,
        default=d.bootstrap,
        help="resamples of the validation images for the mIoU standard error (0 = none)",
    )
    p.add_argument("--voc-train-split", default=d.voc_train_split, choices=("train", "trainaug"))
    p.add_argument("--no-standardize", action="store_true", help="skip per-channel standardisation")
    p.add_argument("--extract-batch-size", type=int, default=d.extract_batch_size)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--cache-dir", default=None, help="keep feature caches on disk (memmap) here")
    p.add_argument("--synthetic-n", type=int, default=40, help="--dataset synthetic: scenes")
    p.add_argument("--synthetic-size", type=int, default=128, help="--dataset synthetic: side")
    p.add_argument("--synthetic-seed", type=int, default=0, help="--dataset synthetic: seed")
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
        voc_train_split=args.voc_train_split,
        standardize=not args.no_standardize,
        seed=args.seed,
        extract_batch_size=args.extract_batch_size,
        num_workers=args.num_workers,
    )
    return cfg, modes


def load_backbones(args) -> list[tuple]:
    """[(model, spec, label, checkpoint description)] for --ckpt/--random-init/--sweep-ckpts."""
    entries = list(args.sweep_ckpts or [])
    if args.ckpt:
        entries.insert(0, args.ckpt)
    if args.random_init:
        entries.insert(0, f"random:{args.random_init}")
    if not entries:
        raise SystemExit("give a backbone: --ckpt PATH, --random-init VARIANT or --sweep-ckpts ...")
    out = []
    for e in entries:
        if e.startswith("random:"):
            variant = e.split(":", 1)[1]
            model = build_model(
                args.arch, variant, seed=args.seed, patch_size=args.patch_size, depth=args.depth
            ).eval()
            desc = {"random_init": variant, "arch": args.arch, "seed": args.seed}
            out.append((model, model.spec, f"random-{variant}", desc))
        else:
            model, spec = load_backbone(e, trust=args.trust_checkpoint)
            st = os.stat(e)
            desc = {"path": str(Path(e).resolve()), "size": st.st_size, "mtime": st.st_mtime}
            out.append((model, spec, label_for(e, spec), desc))
    return out


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg, modes = config_from_args(args)
    device = resolve_device(args.device)
    backbones = load_backbones(args)
    if args.resolution is None and args.dataset == "synthetic" and device.type == "cpu":
        # 448 px upsamples the small scenes ~12x in pixels: minutes per epoch on a CPU
        patch = backbones[0][1].patch_size
        side = -(-args.synthetic_size // patch) * patch
        cfg = replace(cfg, resolution=side)
        print(
            f"--dataset synthetic on CPU: --resolution {side} (the scenes' side; the published "
            f"{LinProbeConfig().resolution} is for real datasets: pass --resolution to choose)",
            file=sys.stderr,
        )
    # Fail fast: every backbone's layers and patch size checked before any data is read.
    for model, _, label, _ in backbones:
        try:
            validate(model, cfg, modes)
        except ValueError as e:
            raise SystemExit(f"{label}: {e}") from None
    synthetic = dict(n=args.synthetic_n, size=args.synthetic_size, seed=args.synthetic_seed)
    train_ds, val_ds, subset, root = build_datasets(args.dataset, args.root, cfg, synthetic)
    cfg = replace(cfg, train_subset=subset)
    out_dir = Path(args.out)
    sweep = len(backbones) > 1
    rows, summaries = [], []
    for model, spec, label, desc in backbones:
        key = {
            "ckpt": desc,
            "spec": spec.to_dict(),
            "dataset": args.dataset,
            "root": str(root),
            "subset": subset,
            "subset_seed": cfg.subset_seed,
            "voc_split": cfg.voc_train_split,
        }
        folder = out_dir / safe_name(label) if sweep else out_dir
        run_id = new_run_id()
        meta = {
            "dataset": args.dataset,
            "root": str(root),
            "num_classes": train_ds.num_classes,
            "label": label,
            "checkpoint": desc,
            "backbone": spec.to_dict(),
            "config": cfg.to_dict(),
            "modes": list(modes),
            "device": str(device),
            "command": command_line() if argv is None else " ".join(["eval.linprobe", *argv]),
        }

        def write_partial(partial, folder=folder, meta=meta, run_id=run_id):
            # the finished single-block probe survives an interrupted multiscale one
            pending = [m for m in modes if m not in partial["results"]]
            partial = {**partial, "results": {k: dict(v) for k, v in partial["results"].items()}}
            save_counts(folder, partial, run_id)
            res = assemble(partial, modes, {"run_id": run_id, "pending": pending, **meta})
            write_json(folder / "results.json", res)
            print(
                f"wrote {folder / 'results.json'} ({', '.join(pending)} pending)", file=sys.stderr
            )

        run = probe_backbone(
            model,
            train_ds,
            val_ds,
            cfg,
            modes,
            device,
            args.cache_dir,
            key,
            progress=not args.quiet,
            on_probe=write_partial,
        )
        save_counts(folder, run, run_id)
        result = assemble(run, modes, {"run_id": run_id, **meta})
        r = table_rows(args.dataset, label, run)
        rows += r
        write_json(folder / "results.json", result)
        atomic_write_text(folder / "results.md", markdown_table(TABLE_HEADERS, r) + "\n")
        summaries.append(result)
    table = markdown_table(TABLE_HEADERS, rows)
    if sweep:
        write_json(
            out_dir / "sweep.json",
            {"rows": [dict(zip(TABLE_HEADERS, r)) for r in rows], "runs": summaries},
        )
        atomic_write_text(out_dir / "sweep.md", table + "\n")
    print(table)
    print(f"\nwrote {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
