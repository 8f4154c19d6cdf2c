"""The paper's story at small scale: train the three variants, evaluate them, write the results page.

    python scripts/replicate_small.py --out results/small_scale            # CPU, synthetic scenes
    python scripts/replicate_small.py --quick --out /tmp/replicate_quick   # minutes: pipeline check
    python scripts/replicate_small.py --out runs/paper --config configs/dino_vits16_skipless_init_adamw.yaml \
        --data /path/to/imagenet/train --dataset-roots voc=/data/VOC coco20k=/data/COCO \
        --optimizers adamw soap --eval-resolution 448          # paper scale, on GPUs

For every (variant, optimizer) it runs, each as its own command-line stage (exactly what a user
would type, so the stages stay independent and every intermediate result is on disk):
pretrain -> exported backbone -> jacobian at init and at the end -> linear probe (single block and
multiscale) -> TokenCut (every block, best reported); then one PCA figure of all runs side by
side and the training curves. Identical data, steps and seeds for every variant: only
``--variant`` / ``--optimizer`` differ between the pretraining commands.

Writes ``OUT/results.json`` (per run: final loss, linprobe mIoU single and multiscale, TokenCut
CorLoc and best layer, kappa per layer at init and at the end) and ``OUT/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("skip", "skipless", "skipless_init")

# Quick mode: the whole pipeline on a 2-block model and a handful of 32 px scenes (CI-sized).
QUICK_PRETRAIN = [
    "model.depth=2",
    "aug.global_size=32",
    "aug.local_size=16",
    "aug.n_local=2",
    "dino.out_dim=256",
    "dino.head_hidden_dim=128",
    "dino.head_bottleneck_dim=64",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "data.batch_size_per_gpu=8",
    "data.num_workers=0",
    "data.synthetic_n=24",
    "data.synthetic_size=48",
    "run.progress=false",
]


def run(cmd: list[str], log: Path) -> float:
    """Run one stage; on failure show the tail of its log (the stage explains itself there)."""
    t0 = time.perf_counter()
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"stage failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - t0


def load_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def final_loss(run_dir: Path) -> float:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return float(json.loads(lines[-1])["loss"])


def kappas(jac_json: Path) -> dict[str, float]:
    return {str(r["layer"]): float(r["kappa"]) for r in load_json(jac_json)["records"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("results/small_scale"))
    p.add_argument("--quick", action="store_true", help="minutes-long pipeline check (CI)")
    p.add_argument("--config", default="configs/quickstart_cpu.yaml", help="pretraining recipe")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--optimizers", nargs="+", default=["adamw"], choices=["adamw", "soap"])
    p.add_argument("--data", default=None, help="ImageFolder for pretraining (default: synthetic)")
    p.add_argument(
        "--dataset-roots",
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="real evaluation data, e.g. voc=/data/VOC coco20k=/data/COCO (default: synthetic)",
    )
    p.add_argument("--eval-resolution", type=int, default=None, help="linear-probe resolution")
    p.add_argument("--probe-epochs", type=int, default=None)
    p.add_argument("--pca-images", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument(
        "pretrain_overrides", nargs="*", help="extra key=value for every pretraining run"
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    quick = args.quick
    roots = dict(kv.split("=", 1) for kv in args.dataset_roots)
    dev = ["--device", args.device] if args.device else []

    overrides = list(QUICK_PRETRAIN if quick else []) + list(args.pretrain_overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    res = args.eval_resolution or (32 if quick else 64)
    probe_epochs = args.probe_epochs or (2 if quick else 30)
    n_pca = args.pca_images or (4 if quick else 10)
    synth = ["--synthetic-n", "12" if quick else "200", "--synthetic-size", "48" if quick else "96"]

    def seg_data() -> list[str]:
        return (
            ["--dataset", "voc", "--root", roots["voc"]]
            if "voc" in roots
            else ["--dataset", "synthetic", *synth]
        )

    def det_data(name: str) -> list[str]:
        return (
            ["--dataset", name, "--root", roots[name]]
            if name in roots
            else ["--dataset", "synthetic", *synth]
        )

    det_sets = [n for n in ("voc12", "coco20k") if n in roots] or ["synthetic"]
    results: dict = {"config": args.config, "quick": quick, "overrides": overrides, "runs": {}}
    timings: dict[str, float] = {}
    run_dirs: dict[str, Path] = {}

    for opt in args.optimizers:
        for variant in args.variants:
            name = f"{variant}_{opt}"
            rdir = out / "runs" / name
            logs = out / "logs" / name
            logs.mkdir(parents=True, exist_ok=True)
            run_dirs[name] = rdir
            rec: dict = {"variant": variant, "optimizer": opt}
            if not (rdir / "backbone.json").exists():
                timings[f"{name}/pretrain"] = run(
                    [py, "-m", "dino_skipless.pretrain", "--config", args.config, "--variant", variant,
                     "--optimizer", opt, "--out", str(rdir), *overrides],
                    logs / "pretrain.txt",
                )  # fmt: skip
            rec["final_loss"] = final_loss(rdir)
            spec = load_json(rdir / "backbone.json")
            arch = [
                "--arch",
                spec["arch"],
                "--depth",
                str(spec["depth"]),
                "--patch-size",
                str(spec["patch_size"]),
            ]
            tokens = ["--tokens", "8" if quick else "16"]
            # kappa at init (same spec, the variant's initialisation) and after training
            for when, src in (
                ("init", ["--variant", variant, *arch]),
                ("end", ["--ckpt", str(rdir)]),
            ):
                jdir = out / "jacobian" / name / when
                timings[f"{name}/jacobian_{when}"] = run(
                    [py, "-m", "dino_skipless.jacobian", *src, *tokens, "--out", str(jdir), *dev],
                    logs / f"jacobian_{when}.txt",
                )
                rec[f"kappa_{when}"] = kappas(jdir / "jacobian.json")
            lp = out / "linprobe" / name
            timings[f"{name}/linprobe"] = run(
                [py, "-m", "eval.linprobe", *seg_data(), "--ckpt", str(rdir), "--mode", "both",
                 "--resolution", str(res), "--epochs", str(probe_epochs), "--num-workers", "0",
                 "--out", str(lp), "--quiet", *dev],
                logs / "linprobe.txt",
            )  # fmt: skip
            lpr = load_json(lp / "results.json")
            rec["linprobe_single_miou"] = lpr["miou"]
            rec["linprobe_multiscale_miou"] = lpr["multiscale"]["miou"]
            for det in det_sets:
                tc = out / "tokencut" / det / name
                timings[f"{name}/tokencut_{det}"] = run(
                    [py, "-m", "tokencut.run", *det_data(det), "--ckpt", str(rdir), "--sweep-layers",
                     "--num-workers", "0", "--out", str(tc), "--quiet", *dev],
                    logs / f"tokencut_{det}.txt",
                )  # fmt: skip
                tcr = load_json(tc / "results.json")
                rec[f"tokencut_{det}"] = {
                    "corloc": tcr["per_layer"][str(tcr["best_layer"])]
                    if str(tcr["best_layer"]) in tcr["per_layer"]
                    else tcr["corloc"],
                    "best_layer": tcr["best_layer"],
                    "per_layer": tcr["per_layer"],
                }
            results["runs"][name] = rec

    ckpts = [a for d in run_dirs.values() for a in ("--ckpt", str(d))]
    pca_png = out / "pca.png"
    pca_data = (
        ["--dataset", "voc", "--root", roots["voc"]]
        if "voc" in roots
        else ["--dataset", "synthetic"]
    )
    timings["pca"] = run(
        [py, "-m", "dino_skipless.pca", *ckpts, *pca_data, "--n", str(n_pca), "--resolution", str(res),
         "--out", str(pca_png), *dev],
        out / "logs" / "pca.txt",
    )  # fmt: skip
    results["pca_figure"] = str(pca_png)
    results["curves_figure"] = str(plot_curves(run_dirs, out / "training_curves.png"))
    results["timings_s"] = timings
    check_results(results)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    (out / "RESULTS.md").write_text(results_markdown(results))
    print((out / "RESULTS.md").read_text())
    return results


def plot_curves(run_dirs: dict[str, Path], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=150)
    for name, rdir in run_dirs.items():
        rows = [json.loads(line) for line in (rdir / "log.jsonl").read_text().splitlines()]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name, lw=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("DINO loss")
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def check_results(results: dict) -> None:
    """Every stage produced numbers, finite and in range (the quick mode's end-to-end check)."""
    for name, rec in results["runs"].items():
        problems = []
        if not math.isfinite(rec["final_loss"]):
            # a skipless run may diverge: that is a result, not a pipeline failure
            rec["diverged"] = True
        for key in ("linprobe_single_miou", "linprobe_multiscale_miou"):
            if not 0.0 <= rec[key] <= 100.0:
                problems.append(f"{key}={rec[key]}")
        for key, val in rec.items():
            if key.startswith("tokencut_") and not 0.0 <= val["corloc"] <= 100.0:
                problems.append(f"{key}={val['corloc']}")
        for when in ("init", "end"):
            if not rec[f"kappa_{when}"] or any(
                k < 1.0 or k != k for k in rec[f"kappa_{when}"].values()
            ):
                problems.append(f"kappa_{when}={rec[f'kappa_{when}']}")
        if problems:
            raise SystemExit(f"run {name}: out-of-range results: {', '.join(problems)}")


def _fmt_kappa(k: float) -> str:
    return "∞" if k >= 1e16 else f"{k:.3g}"


def results_markdown(results: dict) -> str:
    runs = results["runs"]
    lines = [
        "# Small-scale replication",
        "",
        f"Recipe: `{results['config']}`"
        + (" (quick mode)" if results["quick"] else "")
        + (f", overrides `{' '.join(results['overrides'])}`" if results["overrides"] else "")
        + ".",
        "",
        "## Dense linear probing (mIoU, paper Table 2 layout)",
        "",
        "| run | final DINO loss | single block | multiscale |",
        "|---|---|---|---|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['final_loss']:.3f} | {r['linprobe_single_miou']:.2f} | "
            f"{r['linprobe_multiscale_miou']:.2f} |"
        )
    det_keys = sorted({k for r in runs.values() for k in r if k.startswith("tokencut_")})
    lines += ["", "## Object discovery (TokenCut CorLoc, best block; paper Fig. 3 layout)", ""]
    lines += ["| run | " + " | ".join(k.removeprefix("tokencut_") for k in det_keys) + " |"]
    lines += ["|---|" + "---|" * len(det_keys)]
    for name, r in runs.items():
        cells = [f"{r[k]['corloc']:.1f} (block {r[k]['best_layer']})" for k in det_keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    layers = sorted({int(k) for r in runs.values() for k in r["kappa_init"]})
    lines += ["", "## Self-attention Jacobian conditioning κ(K_l K_lᵀ) (paper Table 6 layout)", ""]
    lines += ["| run | when | " + " | ".join(f"L{i}" for i in layers) + " |"]
    lines += ["|---|---|" + "---|" * len(layers)]
    for name, r in runs.items():
        for when in ("init", "end"):
            ks = r[f"kappa_{when}"]
            lines.append(
                f"| {name} | {when} | "
                + " | ".join(_fmt_kappa(ks[str(i)]) if str(i) in ks else "" for i in layers)
                + " |"
            )
    lines += [
        "",
        "## Figures",
        "",
        "![PCA of the last block's patch features](pca.png)",
        "",
        "![DINO training loss](training_curves.png)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
