"""The paper's story at small scale: train the three variants, evaluate them, write the results page.

    python scripts/replicate_small.py --config configs/learn_cpu.yaml --jacobian-every 24 \
        --out results/small_scale                                          # CPU: the results page
    python scripts/replicate_small.py --quick --out runs/replicate_quick   # minutes: pipeline check
    python scripts/replicate_small.py --out runs/paper --config configs/dino_vits16_skipless_init_adamw.yaml \
        --data /path/to/imagenet/train --dataset-roots voc=/data/VOC coco20k=/data/COCO \
        --optimizers adamw soap --eval-resolution 448          # paper scale, on GPUs

For every (variant, optimizer) it runs, each as its own command-line stage (exactly what a user
would type, so the stages stay independent and every intermediate result is on disk):
pretrain -> exported backbone -> jacobian at init and at the end -> linear probe (single block and
multiscale) -> TokenCut (every block, best reported); then one PCA figure of all runs side by
side and the training curves. Identical data, steps and seeds for every variant: only
``--variant`` / ``--optimizer`` differ between the pretraining commands.

Every evaluation is bracketed by reference points measured on the same data (unless
``--no-baselines``): the **floor**, each variant at its own random init (the weights its
pretraining run started from, exported to ``RUN/init``); the **ceiling**, the same
architecture trained end to end on labels with the same budget (``python -m
dino_skipless.supervised``: ``--task cls`` on the pretraining images' class labels for k-NN,
``--task seg`` on other VOC-format scenes' masks for the linear probe and TokenCut); and, for
k-NN, **raw pixels**. Each run is compared with its floor by a paired test on the same images
(k-NN and CorLoc: exact McNemar; mIoU: paired bootstrap), and the share of the floor-to-ceiling
gap it closes is reported.

Writes ``OUT/results.json`` (per run: final loss, collapse monitor, linprobe mIoU single and
multiscale, TokenCut CorLoc and best layer, kappa per layer at init and at the end; per
evaluation: ``floor``, ``ceiling``, ``pixels`` and every run's value, each with its s.e.,
and the paired tests) and ``OUT/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from dino_skipless.dino.checkpoint import INIT_DIR
from dino_skipless.dino.config import build_config, load_yaml
from dino_skipless.fileio import portable_path
from dino_skipless.pretrain import resolve_config
from eval.compare import compare_runs
from eval.knn import paired_knn
from tokencut.compare import compare as tokencut_compare
from tokencut.corloc import paired_diff_se

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
PIXELS = 16  # side of the raw-pixel k-NN baseline's downsampled image
# The evaluation scenes' seeds: pretraining and the cls ceiling see synthetic class folders of
# seed 0 (data.synthetic_seed), the k-NN set is seed 1, so no evaluated image was trained on;
# the seg ceiling trains on VOC-format scenes of seed 1, the linear probe and TokenCut score
# seed-0 scenes.
KNN_SEED = 1
SEG_CEILING_SEED = 1
# The ceilings' peak lr (x batch/256, as DINO's). In supervised runs on 1,000 pattern-class
# images (vit_mini, batch 32, flips only, constant lr) top-1 after 300-400 steps was 40 % at
# 3e-4, 27 % at 1e-3 and 20 % at 3e-3; with the quickstart's DINO lr (1.25e-4) the loss had not
# left ln 6 after 175 steps. A ceiling should be as high as the budget allows, so it gets its
# own lr (0.0025 x 32/256 = 3.1e-4); nothing else differs from the DINO runs.
SUPERVISED_LR = 0.0025


def finished(run_dir: Path) -> bool:
    """A training stage ran to its end: its summary.json exists and does not say otherwise."""
    summary = run_dir / "summary.json"
    return summary.exists() and bool(load_json(summary).get("finished", True))


# Run settings that change what a run learns; the other run.* keys only say where and how
# it logs, so a page can be rebuilt with, e.g., another --jacobian-every.
RECIPE_RUN_KEYS = ("run.seed", "run.precision", "run.max_steps", "run.on_nonfinite")


def _flat(d: dict, prefix: str = "") -> dict:
    """Dotted keys; paths as the run's files record them (``portable_path``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = portable_path(v) if isinstance(v, str) else v
    return out


def recipe_diff(have: dict, want: dict) -> list[str]:
    """``key: reused vs requested`` for every recipe key in which a finished run's config
    (``have``) differs from the one this invocation would train (``want``)."""
    h, w = _flat(have), _flat(want)
    keys = [k for k in sorted(set(h) | set(w)) if not k.startswith("run.") or k in RECIPE_RUN_KEYS]
    return [f"{k}: {h.get(k)!r} vs {w.get(k)!r}" for k in keys if h.get(k) != w.get(k)]


def check_reused(run_dir: Path, have: dict, want: dict) -> None:
    """A finished run is reused only if it is the run this invocation asks for: otherwise the
    page would label its numbers with the wrong recipe."""
    diff = recipe_diff(have, want)
    if diff:
        raise SystemExit(
            f"{run_dir} is a finished run of another recipe than this command's ({len(diff)} "
            "keys differ, reused vs requested):\n  "
            + "\n  ".join(diff[:12])
            + "\npass the --config and overrides it was trained with, or another --out"
        )


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


def last_record(run_dir: Path) -> dict:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


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
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the random-init rows (the same evaluations on untrained models)",
    )
    p.add_argument(
        "--jacobian-every",
        type=int,
        default=None,
        help="condition numbers during pretraining every N epochs (default 2; quick 1)",
    )
    p.add_argument(
        "--reuse-evals",
        action="store_true",
        help="keep evaluation stages whose results.json already exists in OUT (resume a killed "
        "run, or rebuild the page); a finished pretraining run is always reused (an error if it was "
        "trained with another recipe than this command's), a killed one resumed",
    )
    p.add_argument(
        "--ceilings",
        nargs="*",
        default=["cls", "seg"],
        choices=["cls", "seg"],
        help="supervised ceilings to train and evaluate (cls: k-NN; seg: linear probe, TokenCut)",
    )
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
    # identical for every variant: a diverging skipless run skips its non-finite steps (and
    # counts them) instead of stopping, so it still yields a model to evaluate
    overrides += [
        f"run.jacobian_every_epochs={args.jacobian_every or (1 if quick else 2)}",
        "run.on_nonfinite=skip",
    ]
    # 96 px = 12x12 patches of 8 px for the synthetic scenes (64 px was too coarse for the
    # thin objects); 448 for real data and /16 models
    res = args.eval_resolution or (32 if quick else 448 if roots else 96)
    probe_epochs = args.probe_epochs or (2 if quick else 30)
    n_pca = args.pca_images or (4 if quick else 10)
    # 1,600 scenes = 800 probe-training, 400 validation (VOC roles cycle train, val, extra,
    # train); the probe trains on a seeded 200 of the 800. With 100 validation scenes one s.e.
    # of a paired mIoU difference was ~0.5, as large as the differences to resolve; 400 halve it.
    synth = [
        "--synthetic-n",
        "12" if quick else "1600",
        "--synthetic-size",
        "48" if quick else "96",
    ]
    if not quick:
        synth += ["--voc-train-subset", "200"]
    # TokenCut is cheap (~20 ms/image): 400 scenes put one CorLoc s.e. near 2 points
    det_synth = [
        "--synthetic-n",
        "12" if quick else "400",
        "--synthetic-size",
        "48" if quick else "96",
    ]
    # k-NN on the 6 pattern classes (held-out seed): the standard DINO pretraining monitor
    knn_args = (
        ["--dataset", "synthetic", "--synthetic-n", "60", "--synthetic-size", "48",
         "--resize", "32", "--crop", "32", "--synthetic-seed", str(KNN_SEED)]
        if quick
        else ["--root", roots["knn"]]
        if "knn" in roots
        else ["--dataset", "synthetic", "--synthetic-n", "10000", "--synthetic-size", "96",
              "--resize", "64", "--crop", "64", "--synthetic-seed", str(KNN_SEED)]
    )  # fmt: skip

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
            else ["--dataset", "synthetic", *det_synth]
        )

    det_sets = [n for n in ("voc12", "coco20k") if n in roots] or ["synthetic"]
    results: dict = {"config": args.config, "quick": quick, "overrides": overrides, "runs": {}}
    results["baselines"] = {}
    timings: dict[str, float] = {}
    run_dirs: dict[str, Path] = {}
    # stages reused from an earlier invocation keep the wall time they took then
    prev = out / "results.json"
    prev_timings = load_json(prev).get("timings_s", {}) if prev.exists() else {}

    def stage(key: str, cmd: list[str], log: Path, result: Path) -> None:
        if args.reuse_evals and result.exists():
            print(f"reusing {result}", flush=True)
            timings[key] = float(prev_timings.get(key, 0.0))
        else:
            timings[key] = run(cmd, log)

    def evaluate(name: str, src: list[str], rec: dict) -> None:
        """k-NN, linear probe (single + multiscale), TokenCut (every block) of one model."""
        logs = out / "logs" / name
        logs.mkdir(parents=True, exist_ok=True)
        kn = out / "knn" / name
        stage(
            f"{name}/knn",
            [py, "-m", "eval.knn", *knn_args, *src, "--num-workers", "0", "--out", str(kn),
             "--quiet", *dev],
            logs / "knn.txt",
            kn / "results.json",
        )  # fmt: skip
        knr = load_json(kn / "results.json")
        rec["knn_top1"], rec["knn_n_val"] = knr["top1"], knr["n_val"]
        rec["knn_top1_se"] = knr.get("top1_se")
        rec["dirs"] = {"knn": str(kn)}
        lp = out / "linprobe" / name
        stage(
            f"{name}/linprobe",
            [py, "-m", "eval.linprobe", *seg_data(), *src, "--mode", "both",
             "--resolution", str(res), "--epochs", str(probe_epochs), "--num-workers", "0",
             "--out", str(lp), "--quiet", *dev],
            logs / "linprobe.txt",
            lp / "results.json",
        )  # fmt: skip
        lpr = load_json(lp / "results.json")
        rec["linprobe_single_miou"] = lpr["miou"]
        rec["linprobe_multiscale_miou"] = lpr["multiscale"]["miou"]
        rec["linprobe_n_val"] = lpr.get("n_val")
        # bootstrap s.e. over validation images (absent when the probe ran with --bootstrap 0)
        rec["linprobe_single_se"] = lpr.get("miou_se")
        rec["linprobe_multiscale_se"] = lpr["multiscale"].get("miou_se")
        rec["dirs"]["linprobe"] = str(lp)
        for det in det_sets:
            tc = out / "tokencut" / det / name
            stage(
                f"{name}/tokencut_{det}",
                [py, "-m", "tokencut.run", *det_data(det), *src, "--sweep-layers",
                 "--num-workers", "0", "--out", str(tc), "--quiet", *dev],
                logs / f"tokencut_{det}.txt",
                tc / "results.json",
            )  # fmt: skip
            tcr = load_json(tc / "results.json")
            rec[f"tokencut_{det}"] = {
                "corloc": tcr["per_layer"][str(tcr["best_layer"])],
                "best_layer": tcr["best_layer"],
                "n_images": tcr["n_images"],
                "per_layer": tcr["per_layer"],
            }
            rec["dirs"][f"tokencut_{det}"] = str(tc)

    for opt in args.optimizers:
        for variant in args.variants:
            name = f"{variant}_{opt}"
            rdir = out / "runs" / name
            logs = out / "logs" / name
            logs.mkdir(parents=True, exist_ok=True)
            run_dirs[name] = rdir
            rec: dict = {"variant": variant, "optimizer": opt}
            # A finished run (summary.json says so) is reused and a killed one resumed exactly;
            # backbone.json alone proves nothing: it is tracked with the results.
            pretrain_args = ["--config", args.config, "--variant", variant, "--optimizer", opt,
                             "--out", str(rdir), *overrides]  # fmt: skip
            if finished(rdir):
                check_reused(
                    rdir,
                    load_yaml(rdir / "config.yaml").to_dict(),
                    resolve_config(pretrain_args)[0].to_dict(),
                )
                timings[f"{name}/pretrain"] = float(prev_timings.get(f"{name}/pretrain", 0.0))
            else:
                resume = ["--resume"] if (rdir / "checkpoint.pt").exists() else []
                timings[f"{name}/pretrain"] = float(
                    prev_timings.get(f"{name}/pretrain", 0.0) if resume else 0.0
                ) + run(
                    [py, "-m", "dino_skipless.pretrain", *pretrain_args, *resume],
                    logs / "pretrain.txt",
                )  # fmt: skip
            last = last_record(rdir)
            summary = rdir / "summary.json"
            rec["collapse"] = load_json(summary).get("collapse") if summary.exists() else None
            rec["final_loss"] = float(last["loss"])
            rec["nonfinite_skipped"] = int(last.get("nonfinite_skipped", 0))
            rec["steps"] = int(last["step"]) + 1
            spec = load_json(rdir / "backbone.json")
            arch = ["--arch", spec["arch"], "--depth", str(spec["depth"]),
                    "--patch-size", str(spec["patch_size"])]  # fmt: skip
            tokens = ["--tokens", "8" if quick else "16"]
            # the run's own init (the trainer exports it; older runs lack it: a fresh draw of
            # the same spec and variant) is the floor and the kappa at init
            own_init = rdir / INIT_DIR
            has_init = (own_init / "backbone.json").exists()
            init_src = ["--ckpt", str(own_init)] if has_init else ["--random-init", variant, *arch]
            for when, src in (
                ("init", ["--ckpt", str(own_init)] if has_init else ["--variant", variant, *arch]),
                ("end", ["--ckpt", str(rdir)]),
            ):
                jdir = out / "jacobian" / name / when
                stage(
                    f"{name}/jacobian_{when}",
                    [py, "-m", "dino_skipless.jacobian", *src, *tokens, "--out", str(jdir), *dev],
                    logs / f"jacobian_{when}.txt",
                    jdir / "jacobian.json",
                )
                rec[f"kappa_{when}"] = kappas(jdir / "jacobian.json")
            evaluate(name, ["--ckpt", str(rdir)], rec)
            results["runs"][name] = rec
            if not args.no_baselines and variant not in results["baselines"]:
                base: dict = {"variant": variant}
                evaluate(f"random_{variant}", init_src, base)
                results["baselines"][variant] = base

    if not args.no_baselines:
        # the reference points that bracket every evaluation (see the module docstring)
        refs: dict = {}
        kn = out / "knn" / "pixels"
        stage(
            "pixels/knn",
            [py, "-m", "eval.knn", *knn_args, "--pixels", str(PIXELS), "--num-workers", "0",
             "--out", str(kn), "--quiet", *dev],
            out / "logs" / "pixels_knn.txt",
            kn / "results.json",
        )  # fmt: skip
        knr = load_json(kn / "results.json")
        refs["pixels"] = {"knn_top1": knr["top1"], "knn_top1_se": knr.get("top1_se"),
                          "knn_n_val": knr["n_val"], "dirs": {"knn": str(kn)}}  # fmt: skip
        seg_src = (
            ["--seg-root", roots["voc"]]
            if "voc" in roots
            else ["--seg-n", "24" if quick else "1336", "--seg-size", "48" if quick else "96",
                  "--seg-seed", str(SEG_CEILING_SEED)]
        )  # fmt: skip
        for task in args.ceilings:
            name = f"supervised_{task}"
            sdir = out / "runs" / name
            (out / "logs" / name).mkdir(parents=True, exist_ok=True)
            sup_overrides = ["model.variant=skip", *overrides, f"optim.lr={SUPERVISED_LR}"]
            if finished(sdir):
                want = build_config(
                    args.config,
                    [*(tuple(kv.split("=", 1)) for kv in sup_overrides), ("run.out", str(sdir))],
                )
                check_reused(sdir, load_json(sdir / "summary.json")["config"], want.to_dict())
                timings[f"{name}/train"] = float(prev_timings.get(f"{name}/train", 0.0))
            else:
                timings[f"{name}/train"] = run(
                    [py, "-m", "dino_skipless.supervised", "--task", task, "--config", args.config,
                     "--out", str(sdir), *(seg_src if task == "seg" else []), *sup_overrides],
                    out / "logs" / name / "train.txt",
                )  # fmt: skip
            rec = {"variant": "skip", "task": task, **load_json(sdir / "summary.json")}
            rec.pop("config", None)
            evaluate(name, ["--ckpt", str(sdir)], rec)
            refs[name] = rec
        results["references"] = refs
        results["evaluations"] = evaluations(results)

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


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dirs: dict[str, Path], path: Path) -> Path:
    """Loss, teacher entropy (the collapse monitor) and per-layer kappa during pretraining."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.4), dpi=150)
    colors = {}
    for name, rdir in run_dirs.items():
        rows = read_jsonl(rdir / "log.jsonl")
        steps = [r["step"] for r in rows]
        (line,) = axes[0].plot(steps, [r["loss"] for r in rows], label=name, lw=1.2)
        colors[name] = line.get_color()
        if rows and "teacher_entropy" in rows[0]:
            axes[1].plot(steps, [r["teacher_entropy"] for r in rows], color=colors[name], lw=1.2)
            axes[1].plot(steps, [r["teacher_batch_entropy"] for r in rows], color=colors[name],
                         lw=0.8, ls="--")  # fmt: skip
            info = [r["teacher_batch_entropy"] - r["teacher_entropy"] for r in rows]
            axes[3].plot(steps, info, color=colors[name], lw=1.2)
        jac = read_jsonl(rdir / "jacobian.jsonl")
        layers = sorted({r["layer"] for r in jac})
        for layer in layers:
            pts = [(r["step"], min(r["kappa"], 1e20)) for r in jac if r["layer"] == layer]
            shade = 0.35 + 0.65 * (layer + 1) / (layers[-1] + 1)  # deeper blocks darker
            axes[2].plot(*zip(*pts), color=colors[name], lw=1.0, marker="o", ms=2, alpha=shade)
    axes[0].set_ylabel("DINO loss")
    axes[0].legend(fontsize=7, frameon=False)
    axes[1].set_ylabel("teacher entropy (nats)\nsolid: per image, dashed: batch mean")
    axes[2].set_ylabel("κ(K_l K_lᵀ) per block (darker = deeper)")
    axes[2].set_yscale("log")
    axes[3].set_ylabel("target information about the image (nats)\nbatch − per-image entropy")
    axes[3].axhline(0.05, color="k", lw=0.6, ls=":")  # run.collapse_min_info
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def check_results(results: dict) -> None:
    """Every stage produced numbers, finite and in range (the quick mode's end-to-end check)."""
    rows = list(results["runs"].items()) + [
        (f"random_{v}", r) for v, r in results.get("baselines", {}).items()
    ]
    for name, rec in rows:
        problems = []
        if "final_loss" in rec and not math.isfinite(rec["final_loss"]):
            # a skipless run may diverge: that is a result, not a pipeline failure
            rec["diverged"] = True
        for key in ("linprobe_single_miou", "linprobe_multiscale_miou", "knn_top1"):
            if not 0.0 <= rec[key] <= 100.0:
                problems.append(f"{key}={rec[key]}")
        for key, val in rec.items():
            if key.startswith("tokencut_") and not 0.0 <= val["corloc"] <= 100.0:
                problems.append(f"{key}={val['corloc']}")
        for when in ("init", "end"):
            if f"kappa_{when}" in rec and (
                not rec[f"kappa_{when}"]
                or any(k < 1.0 or k != k for k in rec[f"kappa_{when}"].values())
            ):
                problems.append(f"kappa_{when}={rec[f'kappa_{when}']}")
        if problems:
            raise SystemExit(f"run {name}: out-of-range results: {', '.join(problems)}")


# evaluation -> (record key, s.e. key, ceiling model): the ceiling of an evaluation is the
# supervised model trained on that evaluation's kind of label
EVALUATIONS = {
    "knn": ("knn_top1", "knn_top1_se", "supervised_cls"),
    "linprobe_single": ("linprobe_single_miou", "linprobe_single_se", "supervised_seg"),
    "linprobe_multiscale": ("linprobe_multiscale_miou", "linprobe_multiscale_se", "supervised_seg"),
}


def _value(rec: dict, evaluation: str) -> dict | None:
    if evaluation.startswith("tokencut_"):
        if evaluation not in rec:
            return None
        r = rec[evaluation]
        n = r.get("n_images", 0)
        se = 100 * math.sqrt(r["corloc"] / 100 * (1 - r["corloc"] / 100) / n) if n else None
        return {"value": r["corloc"], "se": se, "best_layer": r["best_layer"]}
    key, se_key, _ = EVALUATIONS[evaluation]
    if key not in rec:
        return None
    return {"value": rec[key], "se": rec.get(se_key)}


def paired_test(evaluation: str, a: dict, b: dict) -> dict:
    """A vs B on the same images: difference, its paired s.e., z = diff / s.e., p-value."""
    if evaluation == "knn":
        r = paired_knn(load_json(Path(a["dirs"]["knn"]) / "results.json"),
                       load_json(Path(b["dirs"]["knn"]) / "results.json"))  # fmt: skip
        diff, se, p = r["diff"], r["diff_se"], r["p_value"]
    elif evaluation.startswith("linprobe_"):
        probe = evaluation.removeprefix("linprobe_")
        r = compare_runs(a["dirs"]["linprobe"], b["dirs"]["linprobe"], probe, n_boot=2000)
        diff, se, p = r["diff"], r["se"], r["p"]
    else:
        r = tokencut_compare(
            load_json(Path(a["dirs"][evaluation]) / "results.json"),
            load_json(Path(b["dirs"][evaluation]) / "results.json"),
        )
        r = {**r["reported"], "data_warning": r["data_warning"]}
        diff, p = r["diff"], r["p_value"]
        se = paired_diff_se(r["only_a"], r["only_b"], r["n_images"])  # fmt: skip
    if r.get("data_warning"):  # runs written before data digests: said, not hidden
        print(f"warning: {evaluation}: {r['data_warning']}", file=sys.stderr)
    z = diff / se if se and math.isfinite(se) and se > 0 else None
    return {"diff": diff, "se": se, "z": z, "p": p}


def share_se(gain: dict, room: dict, gap: float) -> float | None:
    """s.e. of the gap share ``f = gain / gap`` (gain = run − floor, gap = ceiling − floor) by
    the delta method from the two paired s.e.s: ``sqrt(se_gain² + f² se_gap²) / gap``. Their
    covariance (both differences contain the floor) is left out."""
    if gain.get("se") is None or room.get("se") is None or gap <= 0:
        return None
    f = gain["diff"] / gap
    return math.sqrt(gain["se"] ** 2 + (f * room["se"]) ** 2) / gap


def evaluations(results: dict) -> dict:
    """Per evaluation: floor (per variant), ceiling, pixels, and each run with its paired test
    against its own floor and the share of the floor-to-ceiling gap it closes."""
    runs, base, refs = results["runs"], results.get("baselines", {}), results.get("references", {})
    dets = sorted({k for r in runs.values() for k in r if k.startswith("tokencut_")})
    out: dict = {}
    for ev in [*EVALUATIONS, *dets]:
        ceiling_name = EVALUATIONS[ev][2] if ev in EVALUATIONS else "supervised_seg"
        e: dict = {"floor": {}, "runs": {}}
        for v, b in base.items():
            e["floor"][v] = _value(b, ev)
        if ceiling_name in refs:
            e["ceiling"] = _value(refs[ceiling_name], ev) | {"model": ceiling_name}
            e["ceiling_vs_floor_skip"] = (
                paired_test(ev, refs[ceiling_name], base["skip"]) if "skip" in base else None
            )
        if ev == "knn" and "pixels" in refs:
            e["pixels"] = _value(refs["pixels"], ev)
        for name, r in runs.items():
            row = _value(r, ev)
            if row is None:
                continue
            v = r["variant"]
            if v in base and _value(base[v], ev) is not None:
                row["vs_floor"] = paired_test(ev, r, base[v])
                if "ceiling" in e:
                    lo, hi = e["floor"][v]["value"], e["ceiling"]["value"]
                    # no room above the floor: a share of it means nothing
                    row["gap_closed"] = (row["value"] - lo) / (hi - lo) if hi > lo else None
                    if hi > lo:
                        room = (
                            e["ceiling_vs_floor_skip"]
                            if v == "skip" and e.get("ceiling_vs_floor_skip")
                            else paired_test(ev, refs[ceiling_name], base[v])
                        )
                        row["gap_closed_se"] = share_se(row["vs_floor"], room, hi - lo)
            e["runs"][name] = row
        out[ev] = e
    return out


def _fmt_kappa(k: float) -> str:
    return "∞" if k >= 1e16 else f"{k:.3g}"


SINGULAR = 1e10  # kappa above this: numerically singular (the paper's "∞")
# The paper's skipless_init layer kappas are 3-20 (Table 6) against ~1-1.5 for skip: we call a
# kappa below WELL_CONDITIONED "the same regime", finite but above it only "partly" fixed.
WELL_CONDITIONED = 1e3
NOISE_SE = 2.0  # a difference of accuracies within 2 standard errors is called noise


def diff_se(p1: float, p2: float, n1: int, n2: int) -> float:
    """Standard error (percent points) of the difference of two accuracies in percent.

    Binomial, the two evaluations treated as independent: conservative for paired runs on the
    same images, which is what we have, so "within noise" errs on the side of not claiming.
    """
    a, b = p1 / 100.0, p2 / 100.0
    return 100.0 * math.sqrt(a * (1 - a) / max(n1, 1) + b * (1 - b) / max(n2, 1))


def compare(new: float, old: float, se: float | None) -> str:
    """``shown`` / ``not shown`` / ``within noise`` for the claim ``new > old``."""
    if se is not None and abs(new - old) < NOISE_SE * se:
        return "within noise"
    return "shown" if new > old else "not shown"


def paper_claims(results: dict) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for each of the paper's claims this run can test.

    Verdicts come from the numbers alone, so the page cannot overstate what was measured:
    differences smaller than ``NOISE_SE`` standard errors are "within noise" (binomial s.e. for
    k-NN and CorLoc, the linear probe's bootstrap s.e. over validation images for mIoU; against
    a run's own init, the paired test of ``results["evaluations"]`` where there is one).
    """
    runs, base = results["runs"], results.get("baselines", {})
    out: list[tuple[str, str, str]] = []
    by = {r["variant"]: r for r in runs.values() if r["optimizer"] == "adamw"} or {
        r["variant"]: r for r in runs.values()
    }
    det = sorted(k for r in runs.values() for k in r if k.startswith("tokencut_"))
    det = det[0] if det else None

    def corloc_se(a: dict, b: dict) -> float | None:
        if "n_images" not in a[det] or "n_images" not in b[det]:
            return None
        return diff_se(a[det]["corloc"], b[det]["corloc"], a[det]["n_images"], b[det]["n_images"])

    def knn_se(a: dict, b: dict) -> float | None:
        if "knn_n_val" not in a or "knn_n_val" not in b:
            return None
        return diff_se(a["knn_top1"], b["knn_top1"], a["knn_n_val"], b["knn_n_val"])

    def miou_se(a: dict, b: dict, mode: str) -> float | None:
        sa, sb = a.get(f"linprobe_{mode}_se"), b.get(f"linprobe_{mode}_se")
        if sa is None or sb is None or not (math.isfinite(sa) and math.isfinite(sb)):
            return None
        return math.hypot(sa, sb)  # bootstrap s.e. of each, treated as independent

    def pm(se: float | None) -> str:
        return f" (± {se:.1f} s.e.)" if se is not None else ""

    if {"skip", "skipless", "skipless_init"} <= by.keys():
        for when, claim in (
            ("init", "Skipless at the default init is ill-conditioned; the paper's init fixes it "
                     "(Sec. 4, Tables 5-6)"),
            ("end", "After training, skipless_init stays well conditioned; skipless does not "
                    "(Table 6)"),
        ):  # fmt: skip
            k = {v: max(by[v][f"kappa_{when}"].values()) for v in by}
            if k["skipless"] > SINGULAR and k["skipless_init"] < WELL_CONDITIONED:
                verdict = "shown"
            elif k["skipless"] > SINGULAR and k["skipless_init"] < SINGULAR:
                verdict = "partly shown"  # finite, but far above the paper's tens
            else:
                verdict = "not shown"
            out.append((
                claim,
                verdict,
                f"max κ at {when}: skip {_fmt_kappa(k['skip'])}, skipless "
                f"{_fmt_kappa(k['skipless'])}, skipless_init {_fmt_kappa(k['skipless_init'])} "
                "(paper, ViT-S: skip 1.0-1.6, skipless ∞, skipless_init 2.7-22)",
            ))  # fmt: skip
    if {"skip", "skipless_init"} <= by.keys():
        s, n = by["skip"], by["skipless_init"]
        for mode, what in (("single", "single block"), ("multiscale", "multiscale")):
            key = f"linprobe_{mode}_miou"
            se = miou_se(n, s, mode)
            out.append(
                (
                    f"skipless_init beats skip on dense linear probing, {what} (Table 2)",
                    compare(n[key], s[key], se),
                    f"mIoU skipless_init {n[key]:.2f} vs skip {s[key]:.2f}{pm(se)}",
                )
            )
        if det:
            se = corloc_se(n, s)
            out.append(
                (
                    "skipless_init beats skip on TokenCut object discovery (Fig. 3)",
                    compare(n[det]["corloc"], s[det]["corloc"], se),
                    f"CorLoc skipless_init {n[det]['corloc']:.1f} vs skip "
                    f"{s[det]['corloc']:.1f}{pm(se)}",
                )
            )
    evals = results.get("evaluations", {})
    run_of = {r["variant"]: name for name, r in runs.items() if r is by.get(r["variant"])}
    for v, r in by.items():
        if v not in base:
            continue
        b = base[v]
        # the paired test of each evaluation against the run's own init (same images) where
        # the page has one, else the unpaired s.e. (which can only understate a gain)
        parts = []
        for name, ev, key in (("k-NN", "knn", "knn_top1"),
                              ("mIoU", "linprobe_single", "linprobe_single_miou"),
                              ("mIoU multiscale", "linprobe_multiscale",
                               "linprobe_multiscale_miou")):  # fmt: skip
            paired = evals.get(ev, {}).get("runs", {}).get(run_of[v], {}).get("vs_floor")
            se = (
                paired["se"]
                if paired
                else knn_se(r, b)
                if ev == "knn"
                else miou_se(r, b, ev.split("_")[1])
            )
            parts.append((name, compare(r[key], b[key], se), r[key] - b[key], se))
        if det:
            paired = evals.get(det, {}).get("runs", {}).get(run_of[v], {}).get("vs_floor")
            se = paired["se"] if paired else corloc_se(r, b)
            parts.append(("CorLoc", compare(r[det]["corloc"], b[det]["corloc"], se),
                          r[det]["corloc"] - b[det]["corloc"], se))  # fmt: skip
        verdicts = [p[1] for p in parts]
        shown = [p[0] for p in parts if p[1] == "shown"]
        verdict = (
            "shown"
            if set(verdicts) == {"shown"}
            else "not shown"
            if "not shown" in verdicts
            else f"shown on {', '.join(shown)} only"
            if shown
            else "within noise"
        )
        out.append((
            f"(precondition, not a paper claim) pretraining taught {v} something: "
            "it beats its own random init",
            verdict,
            "gain over its own init (paired s.e.): "
            + ", ".join(f"{name} {g:+.1f}{pm(se)}" for name, _, g, se in parts),
        ))  # fmt: skip
    return out


EVAL_TITLES = {
    "knn": "k-NN top-1 (%)",
    "linprobe_single": "linear probe mIoU, last block",
    "linprobe_multiscale": "linear probe mIoU, multiscale",
}


def headroom_markdown(results: dict) -> list[str]:
    """Floor, ceiling, pixels and each run per evaluation, with the paired tests."""
    evs = results.get("evaluations")
    if not evs:
        return []
    lines = [
        "",
        "## Floor, ceiling and what pretraining adds",
        "",
        "Floor: the variant at random init. Ceiling: the same architecture (skip variant) "
        "trained end to end on labels with the same budget (`python -m dino_skipless.supervised`"
        "; class labels for k-NN, segmentation masks for the linear probe and TokenCut). "
        "Δ vs floor: a paired test on the same images (k-NN, CorLoc: exact McNemar; mIoU: "
        "paired bootstrap), z = Δ / paired s.e. Gap closed: (run − floor) / (ceiling − floor), "
        "± its delta-method s.e. from the two paired s.e.s (`share_se`).",
    ]

    def val(x: dict | None) -> str:
        if not x:
            return "–"
        return f"{x['value']:.2f}" + (f" ± {x['se']:.2f}" if x.get("se") is not None else "")

    def test(t: dict | None) -> str:
        if not t:
            return "–"
        z = f", z = {t['z']:.1f}" if t.get("z") is not None else ""
        return f"{t['diff']:+.2f}{z}, p = {t['p']:.2g}"

    for ev, e in evs.items():
        title = EVAL_TITLES.get(ev, f"TokenCut CorLoc (%), {ev.removeprefix('tokencut_')}")
        lines += ["", f"**{title}**", "", "| model | value ± s.e. | Δ vs floor | gap closed |"]
        lines += ["|---|---|---|---|"]
        if e.get("pixels"):
            lines.append(f"| raw pixels ({PIXELS}x{PIXELS}) | {val(e['pixels'])} | – | – |")
        for v, f in e["floor"].items():
            lines.append(f"| floor: {v} at its own random init | {val(f)} | – | 0 % |")
        if e.get("ceiling"):
            c = e["ceiling"]
            room = (
                "100 %"
                if c["value"] > e["floor"].get("skip", {"value": 0})["value"]
                else ("no headroom")
            )
            lines.append(
                f"| ceiling: {c['model']} | {val(c)} | {test(e.get('ceiling_vs_floor_skip'))} "
                f"(vs skip floor) | {room} |"
            )
        for name, r in e["runs"].items():
            g, g_se = r.get("gap_closed"), r.get("gap_closed_se")
            gap = (
                "–"
                if g is None
                else f"{100 * g:.1f}" + (f" ± {100 * g_se:.1f} %" if g_se is not None else " %")
            )
            lines.append(f"| DINO {name} | {val(r)} | {test(r.get('vs_floor'))} | {gap} |")
    return lines


def results_markdown(results: dict) -> str:
    runs, base = results["runs"], results.get("baselines", {})
    rows = list(runs.items()) + [(f"random init {v}", r) for v, r in base.items()]
    rows += [
        (f"{name} (ceiling)", r)
        for name, r in results.get("references", {}).items()
        if name.startswith("supervised_")
    ]
    lines = [
        "# Small-scale replication",
        "",
        f"Recipe: `{results['config']}`"
        + (" (quick mode)" if results["quick"] else "")
        + (f", overrides `{' '.join(results['overrides'])}`" if results["overrides"] else "")
        + ". Generated by `scripts/replicate_small.py`; every number below is read from the"
        " stage's own `results.json` under this folder.",
        "",
        "## Dense linear probing (mIoU, paper Table 2 layout) and the k-NN monitor",
        "",
        "mIoU ± its bootstrap standard error over the validation images; k-NN top-1 in percent"
        " (one binomial s.e. is about 100·sqrt(p(1-p)/n)). Differences within two standard"
        " errors are reported as noise in the claims table below.",
        "",
        "| run | steps | final DINO loss | k-NN top-1 | single block | multiscale |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        loss = f"{r['final_loss']:.3f}" if "final_loss" in r else "–"
        if r.get("nonfinite_skipped"):
            loss += f" ({r['nonfinite_skipped']} non-finite steps skipped)"
        if (r.get("collapse") or {}).get("collapsed"):
            loss += f" (collapse alarm at step {r['collapse']['collapsed_at_step']})"
        single, multi = (
            f"{r[f'linprobe_{m}_miou']:.2f}"
            + (f" ± {r[f'linprobe_{m}_se']:.2f}" if r.get(f"linprobe_{m}_se") is not None else "")
            for m in ("single", "multiscale")
        )
        lines.append(
            f"| {name} | {r.get('steps', '–')} | {loss} | {r['knn_top1']:.1f} | {single} | "
            f"{multi} |"
        )
    det_keys = sorted({k for r in runs.values() for k in r if k.startswith("tokencut_")})
    lines += ["", "## Object discovery (TokenCut CorLoc, best block; paper Fig. 3 layout)", ""]
    lines += ["| run | " + " | ".join(k.removeprefix("tokencut_") for k in det_keys) + " |"]
    lines += ["|---|" + "---|" * len(det_keys)]
    for name, r in rows:
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
    lines += headroom_markdown(results)
    lines += [
        "",
        "## The paper's claims at this scale",
        "",
        "| claim | this run | evidence |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | **{v}** | {e} |" for c, v, e in paper_claims(results)]
    lines += [
        "",
        "## Figures",
        "",
        "![PCA of the last block's patch features](pca.png)",
        "",
        "![Training curves: loss, teacher entropy, per-block condition numbers]"
        "(training_curves.png)",
        "",
    ]
    if results.get("timings_s"):
        total = sum(results["timings_s"].values())
        lines += [
            f"Wall time of the stages: {total / 60:.1f} min (a stage reused from an earlier, "
            "interrupted invocation counts 0 when that invocation wrote no timings).",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
