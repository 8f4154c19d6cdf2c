"""TokenCut solver speed: batched torch eigensolve (dense / LOBPCG) vs the official scipy path.

Features are extracted once (timed separately); then each solver runs the whole TokenCut step
(affinity, eigenvector, split, component, box) on the same features. Reports ms/image and the
share of images whose box is identical to the scipy (official) box.

    python scripts/bench_tokencut.py                           # CPU, 20 scenes of 264-440 px
    python scripts/bench_tokencut.py --device cuda --n 200 --fixed
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_skipless.cli import markdown_table, resolve_device  # noqa: E402
from dino_skipless.data import build_detection_dataset, synthetic_root  # noqa: E402
from dino_skipless.features import extract, patch_size  # noqa: E402
from dino_skipless.models import build_model  # noqa: E402
from tokencut.ncut import TokenCutConfig, tokencut_batch  # noqa: E402
from tokencut.run import _Images, bucket_batches, plan_images  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--variant", default="skipless_init")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--n", type=int, default=20, help="synthetic scenes")
    p.add_argument("--size", type=int, default=352, help="side (varies +-25%% unless --fixed)")
    p.add_argument("--fixed", action="store_true", help="all scenes size x size (one bucket)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--solvers", nargs="+", default=["torch", "lobpcg", "scipy"])
    p.add_argument("--eig-dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per solver (best kept)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(args.arch, args.variant, seed=0, patch_size=args.patch_size).eval()
    model = model.to(device)
    ps = patch_size(model)
    root = synthetic_root("voc", n=args.n, size=args.size, seed=0, vary=not args.fixed)
    ds = build_detection_dataset("voc12", root)
    plan = plan_images(ds, ps, no_hard=False)
    images = _Images(ds, plan.items, ps)
    batches = bucket_batches(plan.items, ps, args.batch_size)

    feats = []  # (patch features, grid, sizes) per batch
    sync(device)
    t0 = time.perf_counter()
    for b in batches:
        x = torch.stack([images[k][0] for k in b]).to(device)
        f = extract(model, x, [-1], kind="k")
        feats.append((f.patches(len(model.blocks) - 1), f.grid, [plan.items[k].hw for k in b]))
    sync(device)
    t_feat = time.perf_counter() - t0
    n = len(plan.items)

    base = TokenCutConfig(eig_dtype=getattr(torch, args.eig_dtype))
    boxes, times, degen = {}, {}, {}
    for solver in args.solvers:
        cfg = replace(base, solver=solver)
        best = float("inf")
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            res = [r for f, grid, sizes in feats for r in tokencut_batch(f, grid, ps, sizes, cfg)]
            sync(device)
            best = min(best, time.perf_counter() - t0)
        boxes[solver], times[solver] = [r.box for r in res], best
        degen[solver] = sum(r.degenerate for r in res)

    ref = "scipy" if "scipy" in boxes else args.solvers[0]
    grids = sorted({g for _, g, _ in feats})
    tokens = [g[0] * g[1] for g in grids]
    print(
        f"{n} synthetic scenes ({'fixed' if args.fixed else 'varying'} size ~{args.size}px), "
        f"{args.arch}/{args.patch_size} {args.variant} random init, keys of the last block, "
        f"{len(batches)} batches of equal padded size, {min(tokens)}-{max(tokens)} tokens/image, "
        f"device {device}; feature extraction {1000 * t_feat / n:.1f} ms/image; "
        f"degenerate graphs (no solve): {degen[ref]}\n"
    )
    rows = [
        [
            s,
            args.eig_dtype if s != "scipy" else "float64",
            1000 * times[s] / n,
            times[ref] / times[s],
            f"{100 * sum(a == b for a, b in zip(boxes[s], boxes[ref])) / n:.0f}%",
        ]
        for s in args.solvers
    ]
    print(
        markdown_table(
            ["solver", "dtype", "ms/image", f"speed-up vs {ref}", f"boxes identical to {ref}"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
