"""TokenCut solver speed: the torch solvers (Lanczos, dense eigh, LOBPCG) vs the official scipy solve.

Features are extracted once (timed separately) and each solver gets the same graphs. Two times
per solver, both ms/image over all images:

- ``solve``: the eigen-solve alone (``tokencut.ncut.second_eigvec``) on the same precomputed
  non-degenerate graphs -- the only work that differs between the solvers;
- ``step``: the whole TokenCut step (``tokencut_batch``: affinity, degeneracy test, solve, split,
  component, box), which adds the same work to every solver.

Each time is the best of ``--repeats`` runs (solvers interleaved, so load drift hits all). The
torch solvers run on one CPU thread, and scipy's LAPACK is limited to one thread as well
(``tokencut.scipy_ref``); ``boxes`` counts images whose box equals the scipy (official) box.

The default backbone is a randomly initialised *skip* ViT: its last-block keys give graphs with
structure. The paper's skipless-init network is no good here: at random init its deep tokens
collapse (rank collapse), every graph is uniform, TokenCut skips the solve for all of them and
the benchmark would time nothing but overhead.

The default scenes (336-560 px a side; seed 0: 506-1120 tokens at patch 16) bracket VOC's typical
500 x 375 image (32 x 24 = 768 tokens). The solve's speed-up grows with the size: the dense solve
is O(N^3), Lanczos O(N^2) per step.

    python scripts/bench_tokencut.py                           # CPU, 20 scenes of 336-560 px
    python scripts/bench_tokencut.py --n 40 --solvers torch scipy
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
from tokencut.ncut import (  # noqa: E402
    SOLVERS,
    TokenCutConfig,
    affinity,
    is_degenerate,
    second_eigvec,
    tokencut_batch,
)
from tokencut.run import _Images, bucket_batches, plan_images  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="vit_small")
    p.add_argument(
        "--variant", default="skip", help="random-init backbone (see above why not skipless_init)"
    )
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--n", type=int, default=20, help="synthetic scenes")
    p.add_argument(
        "--size", type=int, default=448, help="side (varies +-25%% unless --fixed); VOC-like"
    )
    p.add_argument("--fixed", action="store_true", help="all scenes size x size (one bucket)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--solvers", nargs="+", default=["torch", "dense", "scipy"], choices=SOLVERS)
    p.add_argument("--eig-dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per solver (best kept)")
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

    dtype = getattr(torch, args.eig_dtype)
    base = TokenCutConfig(eig_dtype=dtype)
    graphs = []  # the non-degenerate graphs of each batch, float64 (as tokencut_batch builds them)
    for f, _, _ in feats:
        a = affinity(f, base.tau, base.eps, base.binary_graph)
        graphs.append(a[~is_degenerate(a)])
    n_solved = sum(len(a) for a in graphs)
    if n_solved == 0:
        raise SystemExit(f"all {n} graphs are degenerate ({args.variant}): nothing to time")

    def solve_all(solver):
        for a in graphs:
            if len(a):
                second_eigvec(a, solver, dtype if solver != "scipy" else torch.float64)

    def step(cfg):
        return [r for f, grid, sizes in feats for r in tokencut_batch(f, grid, ps, sizes, cfg)]

    res, t_solve, t_step = {}, {}, {}
    for solver in args.solvers:  # warm-up (lazy imports, first-call allocations), untimed
        tokencut_batch(*feats[0][:2], ps, feats[0][2], replace(base, solver=solver))
        t_solve[solver] = t_step[solver] = float("inf")
    for _ in range(args.repeats):
        for solver in args.solvers:
            cfg = replace(base, solver=solver)
            sync(device)
            t0 = time.perf_counter()
            solve_all(solver)
            sync(device)
            t1 = time.perf_counter()
            res[solver] = step(cfg)
            sync(device)
            t2 = time.perf_counter()
            t_solve[solver] = min(t_solve[solver], t1 - t0)
            t_step[solver] = min(t_step[solver], t2 - t1)

    ref = "scipy" if "scipy" in res else args.solvers[0]
    grids = sorted({g for _, g, _ in feats})
    tokens = [g[0] * g[1] for g in grids]
    print(
        f"{n} synthetic scenes ({'fixed' if args.fixed else 'varying'} size ~{args.size}px) in "
        f"{len(grids)} patch grids ({min(tokens)}-{max(tokens)} tokens/image), {len(batches)} "
        f"batches of one grid each; {args.arch}/{args.patch_size} {args.variant} random init, "
        f"keys of the last block; device {device}; feature extraction {1000 * t_feat / n:.1f} "
        f"ms/image (not in the times below); degenerate graphs (no solve): {n - n_solved}; "
        f"best of {args.repeats} runs.\n"
        "solve = the eigen-solve alone on the same graphs; step = the whole TokenCut step "
        "(affinity + solve + split + box), the same work apart from the solve.\n"
    )
    rows = [
        [
            s,
            args.eig_dtype if s != "scipy" else "float64",
            1000 * t_solve[s] / n,
            1000 * t_step[s] / n,
            t_solve[ref] / t_solve[s],
            t_step[ref] / t_step[s],
            f"{sum(a.box == b.box for a, b in zip(res[s], res[ref]))}/{n}",
            sum(r.fallback for r in res[s]),
        ]
        for s in args.solvers
    ]
    print(
        markdown_table(
            [
                "solver",
                "dtype",
                "solve ms/image",
                "step ms/image",
                f"solve speed-up vs {ref}",
                f"step speed-up vs {ref}",
                f"boxes = {ref}",
                "dense fallbacks",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
