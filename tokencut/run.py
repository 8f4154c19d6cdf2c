"""TokenCut object discovery and CorLoc (paper Sec. 6.2.2, Fig. 3, Table 4): the command line.

    python -m tokencut.run --dataset voc07 --root datasets/VOC2007 --ckpt run/backbone.pt
    python -m tokencut.run --dataset synthetic --random-init skipless_init --arch vit_small \\
        --sweep-layers --out runs/tokencut

With ``--sweep-layers`` one forward pass yields every block's features. Writes
``OUT/results.json`` and ``OUT/results.md``; the pipeline is ``tokencut.pipeline``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from dino_skipless.cli import (
    ArgumentParser,
    add_backbone_args,
    add_synthetic_args,
    backbone_from_args,
    cli_main,
    default_num_workers,
    flag,
    hold_out_dir,
    resolve_device,
)
from dino_skipless.features import FEATURE_KINDS, patch_size
from dino_skipless.fileio import command_line, new_run_id, write_report
from dino_skipless.ranges import AT_LEAST_1, NON_NEGATIVE

from .ncut import EPS_RANGE, SOLVERS, TAU_RANGE, TokenCutConfig
from .pipeline import (
    DATASETS,
    STAGE,
    data_digest,
    discover,
    load_dataset,
    report_text,
    results_record,
    save_visualisations,
    stage_layers,
    vis_count,
)

# scripts/bench_tokencut.py imports these from here
from .pipeline import _Images as _Images
from .pipeline import bucket_batches as bucket_batches
from .pipeline import plan_images as plan_images


def build_parser() -> argparse.ArgumentParser:
    d = TokenCutConfig()
    p = ArgumentParser(
        prog="python -m tokencut.run",
        description="TokenCut unsupervised object discovery, CorLoc (paper Sec. 6.2.2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument(
        "--root", default=None, help="dataset root (synthetic: cache dir of generated scenes)"
    )
    add_backbone_args(p)
    p.add_argument(
        "--layer", type=flag(int), default=d.layer, help="block index (0-based; -1 = last)"
    )
    p.add_argument("--sweep-layers", action="store_true", help="CorLoc of every block")
    p.add_argument("--feature", default=d.feature, choices=FEATURE_KINDS)
    p.add_argument(
        "--tau", type=flag(float, TAU_RANGE), default=d.tau, help="affinity threshold (cosine)"
    )
    p.add_argument("--eps", type=flag(float, EPS_RANGE), default=d.eps, help="weight of non-edges")
    p.add_argument(
        "--no-binary-graph", action="store_true", help="ablation: keep similarities >= tau"
    )
    p.add_argument("--solver", default=d.solver, choices=SOLVERS)
    p.add_argument("--eig-dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--no-hard", action="store_true", help="drop difficult/truncated boxes")
    p.add_argument(
        "--max-images", type=flag(int, AT_LEAST_1), default=None, help="first N images only"
    )
    p.add_argument(
        "--batch-size", type=flag(int, AT_LEAST_1), default=16, help="images per forward pass"
    )
    p.add_argument(
        "--num-workers",
        type=flag(int, NON_NEGATIVE),
        default=default_num_workers(),
        help="image-loading workers (4, at most the CPU count)",
    )
    add_synthetic_args(p, n=40, size=128)
    p.add_argument(
        "--synthetic-vary", action="store_true", help="--dataset synthetic: sides vary +-25%%"
    )
    p.add_argument("--out", default="runs/tokencut", help="output folder")
    p.add_argument("--save-vis", default=None, metavar="DIR", help="write PNGs of predictions")
    p.add_argument(
        "--vis-max", type=flag(int, NON_NEGATIVE), default=50, help="images visualised (0 = all)"
    )
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
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    hold_out_dir(args.out, STAGE)
    if args.save_vis and Path(args.save_vis).resolve() != Path(args.out).resolve():
        hold_out_dir(args.save_vis, STAGE, report=None)  # a second output folder: checked now
    model, spec, label = backbone_from_args(args)
    model = model.to(device).eval()
    layers = stage_layers(model, cfg.layer, args.sweep_layers)
    synthetic = dict(
        n=args.synthetic_n, size=args.synthetic_size, seed=args.synthetic_seed,
        vary=args.synthetic_vary,
    )  # fmt: skip
    ds, root = load_dataset(args.dataset, args.root, synthetic)
    plan, preds, seconds = discover(
        model, ds, cfg, layers, device, max_images=args.max_images, batch_size=args.batch_size,
        num_workers=args.num_workers, vis_max=args.vis_max if args.save_vis else None,
        progress=not args.quiet, where=f"{args.dataset} at {root}",
    )  # fmt: skip
    results = results_record(
        plan, preds, cfg, seconds, sweep=args.sweep_layers, run_id=new_run_id(),
        dataset=args.dataset, root=root, label=label, spec=spec, command=command_line(),
        digest=data_digest(ds, plan.items),
    )  # fmt: skip
    text = report_text(results, args.sweep_layers, device)
    write_report(Path(args.out) / "results", results, text)
    print(text)
    if args.save_vis:
        n_vis = vis_count(len(plan.items), args.vis_max)
        save_visualisations(
            args.save_vis, ds, plan, preds[results["layer"]], n_vis, patch_size(model)
        )
        print(f"wrote {n_vis} visualisations to {args.save_vis}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
