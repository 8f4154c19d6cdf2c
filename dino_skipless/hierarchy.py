"""How hierarchical are the blocks? Layer-similarity maps (linear CKA between every pair of
depths) and per-block probes, for any checkpoints (the paper's thesis made measurable; the
paper itself shows only PCA pictures).

    python -m dino_skipless.hierarchy --random-init skip --random-init skipless \\
        --random-init skipless_init --arch vit_small --dataset synthetic --out runs/hierarchy
    python -m dino_skipless.hierarchy --ckpt runs/skip --ckpt runs/skipless_init \\
        --dataset voc --root /data/VOC --knn-root /data/imagenet --out results/hierarchy

CKA maps (patch tokens and CLS token, minibatch CKA on the unbiased HSIC) and their summary
numbers on the validation images of ``--dataset``; per-block linear-probe mIoU on the same
dataset (``--no-probe``: off); per-block k-NN top-1 on class folders (``--knn-root``, or the
synthetic pattern folders with ``--dataset synthetic``; ``--no-knn``: off). Definitions:
``dino_skipless/hierarchy_lib.py``; protocol: ``dino_skipless/hierarchy_eval.py``.

Writes ``DIR/results.json`` (one record per model under ``models``), ``DIR/hsic_batches.npz``
(the per-minibatch HSIC behind every map, for ``hierarchy_lib.hierarchy_claim``; read both back
with ``hierarchy_eval.load_results(DIR)``), ``DIR/results.md`` and ``DIR/hierarchy.png``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from eval.knn_lib import KNNConfig, knn_root
from eval.linprobe_lib import DATASETS, build_datasets, synthetic_cpu_resolution
from eval.probe_lib import LinProbeConfig

from .cli import add_backbone_args, backbones_from_args, cli_main, resolve_device
from .features import check_input_size
from .fileio import atomic_write_text, command_line, new_run_id
from .hierarchy_eval import (
    HierarchyConfig,
    claims_for,
    evaluate_model,
    results_markdown,
    save_results,
)
from .hierarchy_figure import hierarchy_figure
from .pca_lib import single_thread


def build_parser() -> argparse.ArgumentParser:
    d, lp, kn = HierarchyConfig(), LinProbeConfig(), KNNConfig()
    p = argparse.ArgumentParser(
        prog="python -m dino_skipless.hierarchy",
        description="Layer-similarity maps (linear CKA) and per-block k-NN / linear probes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=DATASETS, help="segmentation dataset")
    p.add_argument("--root", default=None, help="dataset root (synthetic: its cache dir)")
    add_backbone_args(p, multiple=True)
    g = p.add_argument_group("CKA")
    g.add_argument(
        "--resolution", type=int, default=None,
        help=f"input side (default {d.resolution}; --dataset synthetic on CPU: the scenes' side "
        "rounded up to the patch size)",
    )  # fmt: skip
    g.add_argument("--batch-images", type=int, default=d.batch_images, help="images per minibatch")
    g.add_argument(
        "--patch-tokens", type=int, default=d.patch_tokens, help="patch positions per image"
    )
    g.add_argument("--max-images", type=int, default=None, help="CKA images (default: all val)")
    g.add_argument("--threshold", type=float, default=d.threshold, help="of the effective depth")
    g.add_argument("--bootstrap", type=int, default=d.bootstrap, help="resamples (0: no s.e.)")
    g.add_argument(
        "--cka-seed", type=int, default=d.seed,
        help="image order, sampled positions and bootstrap: keep it fixed so that models "
        "(any --seed) are compared on the same minibatches (paired)",
    )  # fmt: skip
    g = p.add_argument_group("per-block linear probe (as eval.linprobe)")
    g.add_argument("--no-probe", action="store_true", help="CKA (and k-NN) only")
    g.add_argument("--epochs", type=int, default=lp.epochs)
    g.add_argument("--lrs", type=float, nargs="+", default=list(lp.lrs))
    g.add_argument("--batch-size", type=int, default=lp.batch_size, help="probe batch")
    g.add_argument(
        "--train-subset", type=int, default=lp.train_subset,
        help="ADE20K/COCO-Stuff training images (seeded subset; 0 = all; VOC uses all)",
    )  # fmt: skip
    g.add_argument("--voc-train-split", default=lp.voc_train_split, choices=("train", "trainaug"))
    g.add_argument(
        "--voc-train-subset", type=int, default=None,
        help="VOC: a seeded subset of this many training images (default: the whole split)",
    )  # fmt: skip
    g.add_argument("--probe-bootstrap", type=int, default=lp.bootstrap, help="mIoU s.e. resamples")
    g = p.add_argument_group("per-block k-NN (as eval.knn)")
    g.add_argument("--no-knn", action="store_true", help="no k-NN")
    g.add_argument(
        "--knn-root", default=None,
        help="ImageFolder root (train/ + val/, or one folder); default with --dataset synthetic: "
        "the synthetic pattern folders (cached beside the scenes)",
    )  # fmt: skip
    g.add_argument("--k", type=int, default=kn.k[0])
    g.add_argument("--temperature", type=float, default=kn.temperature)
    g.add_argument("--knn-resize", type=int, default=kn.resize)
    g.add_argument("--knn-crop", type=int, default=kn.crop)
    g.add_argument("--knn-synthetic-n", type=int, default=120)
    g.add_argument("--knn-synthetic-size", type=int, default=64)
    g.add_argument("--knn-synthetic-seed", type=int, default=0)
    g = p.add_argument_group("data")
    # 400 scenes: 100 validation scenes (VOC roles cycle train, val, extra, train) make 6
    # minibatches of 16 for the CKA bootstrap; eval.linprobe's 40 would not make one
    g.add_argument("--synthetic-n", type=int, default=400, help="--dataset synthetic: scenes")
    g.add_argument("--synthetic-size", type=int, default=96, help="--dataset synthetic: side")
    g.add_argument("--synthetic-seed", type=int, default=0, help="--dataset synthetic: seed")
    g.add_argument(
        "--cache-dir", default=None,
        help="keep the per-block feature caches of the probes on disk (a temporary folder "
        "here) instead of in memory",
    )  # fmt: skip
    g.add_argument("--extract-batch-size", type=int, default=d.extract_batch_size)
    g.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--out", default="runs/hierarchy", help="output folder")
    p.add_argument("--pdf", action="store_true", help="also write the figure as PDF")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def configs_from_args(args, parser) -> tuple[HierarchyConfig, LinProbeConfig, KNNConfig]:
    try:
        cfg = HierarchyConfig(
            resolution=args.resolution or HierarchyConfig.resolution,
            batch_images=args.batch_images,
            patch_tokens=args.patch_tokens,
            max_images=args.max_images,
            threshold=args.threshold,
            bootstrap=max(0, args.bootstrap),
            seed=args.cka_seed,
            extract_batch_size=args.extract_batch_size,
            num_workers=args.num_workers,
        )
    except ValueError as e:
        parser.error(str(e))
    probe = replace(
        LinProbeConfig(),
        resolution=cfg.resolution,
        epochs=args.epochs,
        lrs=tuple(args.lrs),
        batch_size=args.batch_size,
        train_subset=args.train_subset if args.train_subset and args.train_subset > 0 else None,
        voc_train_split=args.voc_train_split,
        voc_train_subset=args.voc_train_subset or None,
        bootstrap=max(0, args.probe_bootstrap),
        seed=args.seed,
        extract_batch_size=args.extract_batch_size,
        num_workers=args.num_workers,
    )
    knn = replace(
        KNNConfig(),
        k=(args.k,),
        temperature=args.temperature,
        resize=args.knn_resize,
        crop=args.knn_crop,
        split_seed=args.seed,
        num_workers=args.num_workers,
    )
    return cfg, probe, knn


def checkpoint_descs(args) -> list[dict]:
    """What each backbone is, in ``backbones_from_args``'s order (checkpoints, then inits)."""
    out = [{"path": str(Path(c).resolve())} for c in args.ckpt or []]
    out += [
        {"random_init": v, "arch": args.arch, "patch_size": args.patch_size, "depth": args.depth,
         "seed": args.seed}
        for v in args.random_init or []
    ]  # fmt: skip
    return out


@cli_main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, probe_cfg, knn_cfg = configs_from_args(args, parser)
    device = resolve_device(args.device)
    with single_thread():  # the paper init's small SVDs (see dino_skipless.pca)
        backbones = backbones_from_args(args)
    if args.resolution is None and args.dataset == "synthetic" and device.type == "cpu":
        patch = max(spec.patch_size for _, spec, _ in backbones)
        side = synthetic_cpu_resolution(probe_cfg, patch, args.synthetic_size).resolution
        cfg, probe_cfg = replace(cfg, resolution=side), replace(probe_cfg, resolution=side)
    for model, _, label in backbones:  # every flag checked before the first image is read
        try:
            check_input_size(model, cfg.resolution, cfg.resolution)
            if not args.no_knn:
                check_input_size(model, knn_cfg.crop, knn_cfg.crop)
        except ValueError as e:
            raise SystemExit(f"{label}: {e}") from None
    synthetic = dict(n=args.synthetic_n, size=args.synthetic_size, seed=args.synthetic_seed)
    train_ds, val_ds, subset, root = build_datasets(args.dataset, args.root, probe_cfg, synthetic)
    n_cka = len(val_ds) if cfg.max_images is None else min(len(val_ds), cfg.max_images)
    if n_cka < cfg.batch_images:
        raise SystemExit(
            f"CKA needs at least --batch-images {cfg.batch_images} validation images; "
            f"{root} has {len(val_ds)} (use a smaller --batch-images or more images)"
        )
    kroot = None
    if not args.no_knn and (args.knn_root or args.dataset == "synthetic"):
        ksyn = dict(n=args.knn_synthetic_n, size=args.knn_synthetic_size,
                    seed=args.knn_synthetic_seed)  # fmt: skip
        # synthetic: the pattern folders live in the scenes' cache folder (--root)
        kroot = (
            knn_root("imagefolder", args.knn_root)
            if args.knn_root
            else knn_root("synthetic", args.root, ksyn)
        )
    elif not args.no_knn:
        print("no --knn-root: per-block k-NN skipped", file=sys.stderr)
    models = []
    labels = [label for _, _, label in backbones]
    # two files of one run folder (backbone.pt, checkpoint.pt) get one label: number them
    labels = [f"{la} [{i}]" if labels.count(la) > 1 else la for i, la in enumerate(labels)]
    for (model, spec, _), label, desc in zip(backbones, labels, checkpoint_descs(args)):
        print(f"{label}: ...", file=sys.stderr)
        rec = evaluate_model(
            model, val_ds, cfg, seg_train=None if args.no_probe else train_ds,
            probe_cfg=probe_cfg, knn_root=kroot, knn_cfg=knn_cfg, device=device,
            cache_dir=args.cache_dir, progress=not args.quiet,
        )  # fmt: skip
        models.append({"label": label, "checkpoint": desc, "backbone": spec.to_dict(), **rec})
    out = Path(args.out)
    record = {
        "run_id": new_run_id(),
        "command": command_line() if argv is None else " ".join(["hierarchy", *argv]),
        "dataset": args.dataset,
        "root": str(root),
        "train_subset": subset,
        "knn_root": str(kroot) if kroot else None,
        "device": str(device),
        "config": cfg.to_dict(),
        "probe_config": None if args.no_probe else probe_cfg.to_dict(),
        "knn_config": knn_cfg.to_dict() if kroot else None,
        "models": models,
        "claims": claims_for(models, cfg.threshold, cfg.seed),
    }
    table = results_markdown(record)
    save_results(out, record)
    atomic_write_text(out / "results.md", table)
    figs = [out / "hierarchy.png"] + ([out / "hierarchy.pdf"] if args.pdf else [])
    hierarchy_figure(models, figs)
    print(table)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
