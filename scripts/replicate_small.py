"""The paper's story at small scale: train the three variants, evaluate them, write the results page.

    python scripts/replicate_small.py --config configs/quickstart_cpu.yaml --jacobian-every 24 \
        --seeds 3 --full-eval-seeds 1 --seed-ceilings --out results/small_scale --reuse-evals
                                                          # CPU: the results page, 3 training seeds
    python scripts/replicate_small.py --config configs/quickstart_cpu.yaml --world photos \
        --jacobian-every 24 --seeds 3 --out results/small_scale/photos --reuse-evals  # photographs
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

``--seeds N`` trains every run with training seeds 0..N-1 (``RUN_seed{s}`` after seed 0) and
the page compares variants by seed-level statistics (mean ± s.e. over seeds, a paired t-test by
seed), the image-level paired tests staying for "beats its own init"; ``--full-eval-seeds M``
runs the probe and TokenCut for the first M seeds only (k-NN and kappa for all). Finished runs
are reused, killed ones resumed, so seeds can be added over several sittings;
``--only-finished`` renders the page from what is finished and lists the rest as missing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from dino_skipless.dino.checkpoint import INIT_DIR
from dino_skipless.dino.config import build_config, load_yaml
from dino_skipless.fileio import atomic_write_text, write_json
from dino_skipless.pretrain import resolve_config
from dino_skipless.replication import hierarchy as hier
from dino_skipless.replication.seeds import compare_models, fmt_seed, fmt_test, seed_rows
from dino_skipless.replication.stages import (  # noqa: F401  (finished, recipe_diff: tests)
    Stages,
    check_reused,
    finished,
    last_record,
    load_json,
    read_jsonl,
    recipe_diff,
    run,
)
from dino_skipless.stats import NOISE_SE  # within 2 s.e.: "within noise"
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
    "monitor.knn_bank=40",
    "monitor.knn_queries=20",
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
WORLD_CHOICES = ("patterns", "photos")


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
    p.add_argument(
        "--seeds", type=int, default=1,
        help="training seeds (run.seed 0..N-1) of every variant and ceiling; claims that compare "
        "variants use the spread over them",
    )  # fmt: skip
    p.add_argument(
        "--full-eval-seeds", type=int, default=None, metavar="M",
        help="seeds below M get every evaluation, the others k-NN and kappa only (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--seed-ceilings", nargs="*", default=None, choices=["cls", "seg"],
        help="ceilings trained for every seed (default: every ceiling of --ceilings); the others "
        "for seed 0 only",
    )  # fmt: skip
    p.add_argument(
        "--world", choices=WORLD_CHOICES, default="patterns",
        help="small world without --data: patterns (synthetic, with VOC-format scenes for the "
        "probe and TokenCut) or photos (real photographs; k-NN only)",
    )  # fmt: skip
    p.add_argument("--data", default=None, help="ImageFolder for pretraining (default: a world)")
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
    p.add_argument(
        "--no-hierarchy", action="store_true",
        help="skip the layer-similarity stage (dino_skipless.hierarchy: CKA maps of every run at "
        "init and after DINO, per-block k-NN for the fully evaluated seeds)",
    )  # fmt: skip
    p.add_argument("--device", default=None)
    p.add_argument(
        "--only-finished",
        action="store_true",
        help="train nothing: the page from the runs already finished (the others are listed as "
        "missing), e.g. while seeds are still being added or when a variant has fewer seeds",
    )
    p.add_argument(
        "pretrain_overrides", nargs="*", help="extra key=value for every pretraining run"
    )
    return p


def seed_suffix(seed: int) -> str:
    """Seed 0 keeps the plain names (``skip_adamw``), others get ``_seed<N>``."""
    return "" if seed == 0 else f"_seed{seed}"


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    quick = args.quick
    roots = dict(kv.split("=", 1) for kv in args.dataset_roots)
    dev = ["--device", args.device] if args.device else []
    photos = args.world == "photos" and not args.data
    seeds = list(range(max(args.seeds, 1)))
    full_eval = set(seeds[: args.full_eval_seeds] if args.full_eval_seeds is not None else seeds)
    ceilings = [] if photos and args.ceilings == ["cls", "seg"] else list(args.ceilings)
    if photos:
        ceilings = [c for c in (args.ceilings or []) if c == "cls"]  # no masks in photographs
    seed_ceilings = set(ceilings if args.seed_ceilings is None else args.seed_ceilings)

    overrides = list(QUICK_PRETRAIN if quick else []) + list(args.pretrain_overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    elif photos:
        overrides.append("data.world=photos")
    # identical for every variant: a diverging skipless run skips its non-finite steps (and
    # counts them) instead of stopping, so it still yields a model to evaluate
    overrides += [
        f"run.jacobian_every_epochs={args.jacobian_every or (1 if quick else 2)}",
        "run.on_nonfinite=skip",
    ]
    base_cfg = resolve_config(["--config", args.config, *overrides])[0]
    world_data = base_cfg.data
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
    # k-NN on the pattern classes (held-out seed), or the photos world's val-region crops
    # against its train-region crops: the standard DINO pretraining monitor
    if photos:
        knn_args = ["--dataset", "photos", "--synthetic-n", str(world_data.synthetic_n),
                    "--synthetic-size", str(world_data.synthetic_size),
                    "--synthetic-seed", str(world_data.synthetic_seed)]  # fmt: skip
        knn_args += (
            ["--resize", "32", "--crop", "32"] if quick else ["--resize", "64", "--crop", "64"]
        )
    else:
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

    det_sets = [] if photos else [n for n in ("voc12", "coco20k") if n in roots] or ["synthetic"]
    results: dict = {
        "config": args.config,
        "quick": quick,
        "world": "data" if args.data else args.world,
        "overrides": overrides,
        "seeds": seeds,
        "full_eval_seeds": sorted(full_eval),
        "runs": {},
        "missing": [],  # runs of the design not finished (--only-finished)
    }
    results["baselines"] = {}
    run_dirs: dict[str, Path] = {}
    # stages reused from an earlier invocation keep the wall time they took then
    prev = out / "results.json"
    stages = Stages(args.reuse_evals, load_json(prev).get("timings_s", {}) if prev.exists() else {})
    stage, timings = stages.stage, stages.timings

    def evaluate(name: str, src: list[str], rec: dict, full: bool = True) -> None:
        """k-NN, and with ``full`` the linear probe (single + multiscale) and TokenCut (every
        block) of one model."""
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
        if not full or photos:
            return
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

    def train_stage(key: str, run_dir: Path, cmd: list[str], log: Path, want: dict, have) -> None:
        """A training stage: a finished run is reused (under this recipe only), a killed one
        resumed exactly, else trained; its time comes from its own summary."""
        if finished(run_dir):
            check_reused(run_dir, have(), want)
        else:
            resume = ["--resume"] if (run_dir / "checkpoint.pt").exists() else []
            run([*cmd, *resume], log)
        summary = load_json(run_dir / "summary.json")
        stages.reused(key, summary.get("time_s", summary.get("train_time_s")))

    for seed in seeds:
        sfx = seed_suffix(seed)
        full = seed in full_eval
        for opt in args.optimizers:
            for variant in args.variants:
                group = f"{variant}_{opt}"
                name = group + sfx
                rdir = out / "runs" / name
                if args.only_finished and not finished(rdir):
                    results["missing"].append(name)
                    continue
                logs = out / "logs" / name
                logs.mkdir(parents=True, exist_ok=True)
                run_dirs[name] = rdir
                rec: dict = {"variant": variant, "optimizer": opt, "seed": seed, "group": group}
                # A finished run (summary.json says so) is reused and a killed one resumed
                # exactly; backbone.json alone proves nothing: it is tracked with the results.
                pretrain_args = ["--config", args.config, "--variant", variant, "--optimizer",
                                 opt, "--out", str(rdir), *overrides, f"run.seed={seed}"]  # fmt: skip
                train_stage(
                    f"{name}/pretrain",
                    rdir,
                    [py, "-m", "dino_skipless.pretrain", *pretrain_args],
                    logs / "pretrain.txt",
                    resolve_config(pretrain_args)[0].to_dict(),
                    lambda rdir=rdir: load_yaml(rdir / "config.yaml").to_dict(),
                )
                last = last_record(rdir)
                summary = load_json(rdir / "summary.json")
                rec["collapse"] = summary.get("collapse")
                rec["knn_monitor"] = summary.get("knn_monitor")
                rec["final_loss"] = float(last["loss"])
                rec["nonfinite_skipped"] = int(last.get("nonfinite_skipped", 0))
                rec["steps"] = int(last["step"]) + 1
                spec = load_json(rdir / "backbone.json")
                arch = ["--arch", spec["arch"], "--depth", str(spec["depth"]),
                        "--patch-size", str(spec["patch_size"])]  # fmt: skip
                tokens = ["--tokens", "8" if quick else "16"]
                # the run's own init (the trainer exports it; older runs lack it: a fresh draw
                # of the same spec and variant) is the floor and the kappa at init
                own_init = rdir / INIT_DIR
                has_init = (own_init / "backbone.json").exists()
                init_src = (
                    ["--ckpt", str(own_init)] if has_init else ["--random-init", variant, *arch]
                )
                for when, src in (
                    ("init", ["--ckpt", str(own_init)] if has_init else ["--variant", variant, *arch]),
                    ("end", ["--ckpt", str(rdir)]),
                ):  # fmt: skip
                    jdir = out / "jacobian" / name / when
                    stage(
                        f"{name}/jacobian_{when}",
                        [py, "-m", "dino_skipless.jacobian", *src, *tokens, "--out", str(jdir),
                         *dev],
                        logs / f"jacobian_{when}.txt",
                        jdir / "jacobian.json",
                    )  # fmt: skip
                    rec[f"kappa_{when}"] = kappas(jdir / "jacobian.json")
                evaluate(name, ["--ckpt", str(rdir)], rec, full)
                floor = variant + sfx
                rec["floor"] = floor
                results["runs"][name] = rec
                if not args.no_baselines and floor not in results["baselines"]:
                    base: dict = {"variant": variant, "seed": seed}
                    evaluate(f"random_{floor}", init_src, base, full)
                    results["baselines"][floor] = base

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
        for seed in seeds:
            sfx = seed_suffix(seed)
            for task in ceilings:
                if seed and task not in seed_ceilings:
                    continue
                name = f"supervised_{task}{sfx}"
                sdir = out / "runs" / name
                if args.only_finished and not finished(sdir):
                    results["missing"].append(name)
                    continue
                (out / "logs" / name).mkdir(parents=True, exist_ok=True)
                sup_overrides = ["model.variant=skip", *overrides, f"optim.lr={SUPERVISED_LR}",
                                 f"run.seed={seed}"]  # fmt: skip
                want = build_config(
                    args.config,
                    [*(tuple(kv.split("=", 1)) for kv in sup_overrides), ("run.out", str(sdir))],
                )
                train_stage(
                    f"{name}/train",
                    sdir,
                    [py, "-m", "dino_skipless.supervised", "--task", task, "--config",
                     args.config, "--out", str(sdir), *(seg_src if task == "seg" else []),
                     *sup_overrides],
                    out / "logs" / name / "train.txt",
                    want.to_dict(),
                    lambda sdir=sdir: load_json(sdir / "summary.json")["config"],
                )  # fmt: skip
                rec = {"variant": "skip", "task": task, "seed": seed,
                       **load_json(sdir / "summary.json")}  # fmt: skip
                rec.pop("config", None)
                evaluate(name, ["--ckpt", str(sdir)], rec, seed in full_eval)
                refs[name] = rec
        results["references"] = refs
        results["evaluations"] = evaluations(results)
        results["seed_level"] = seed_level(results)

    if not (photos or args.no_hierarchy):
        results["hierarchy"] = hierarchy_section(
            results, run_dirs, full_eval, out, stage, seg_data(), knn_args, res, dev, quick
        )
    seed0 = {
        n: d for n, d in run_dirs.items() if n in results["runs"] and not results["runs"][n]["seed"]
    }
    if not photos:
        ckpts = [a for d in seed0.values() for a in ("--ckpt", str(d))]
        pca_png = out / "pca.png"
        pca_data = (
            ["--dataset", "voc", "--root", roots["voc"]]
            if "voc" in roots
            else ["--dataset", "synthetic"]
        )
        timings["pca"] = run(
            [py, "-m", "dino_skipless.pca", *ckpts, *pca_data, "--n", str(n_pca),
             "--resolution", str(res), "--out", str(pca_png), *dev],
            out / "logs" / "pca.txt",
        )  # fmt: skip
        results["pca_figure"] = str(pca_png)
    results["curves_figure"] = str(plot_curves(run_dirs, out / "training_curves.png"))
    results["timings_s"] = timings
    check_results(results)
    write_json(out / "results.json", results)
    atomic_write_text(out / "RESULTS.md", results_markdown(results, out))
    print((out / "RESULTS.md").read_text())
    return results


def hierarchy_section(
    results, run_dirs, full_eval, out, stage, seg_args, knn_args, res, dev, quick
) -> dict:
    """The hierarchy stage on every run (its own init and after DINO) and every ceiling: CKA on
    the probe's validation scenes for all, per-block k-NN on the page's k-NN images for the
    fully evaluated seeds; the summary table, the claims across seeds and the seed-0 figure."""
    # the page's k-NN images, in the hierarchy stage's flags
    flags = {"--dataset": None, "--synthetic-n": "--knn-synthetic-n", "--root": "--knn-root",
             "--synthetic-size": "--knn-synthetic-size", "--synthetic-seed":
             "--knn-synthetic-seed", "--resize": "--knn-resize", "--crop": "--knn-crop"}  # fmt: skip
    knn = [a for k, v in zip(knn_args[::2], knn_args[1::2]) if flags[k] for a in (flags[k], v)]
    py = sys.executable
    # quick: the probe's 12 scenes hold 3 validation scenes, under one CKA minibatch of 4
    quick_scenes = ["--synthetic-n", "40"] if quick and "synthetic" in seg_args else []
    models: list[tuple[str, str, Path, int]] = []
    for name, rec in results["runs"].items():
        if (run_dirs[name] / INIT_DIR / "backbone.json").exists():
            models.append((name, "init", run_dirs[name] / INIT_DIR, rec["seed"]))
        models.append((name, "end", run_dirs[name], rec["seed"]))
    for name, rec in results.get("references", {}).items():
        if name.startswith("supervised_"):
            models.append((name, "end", out / "runs" / name, rec["seed"]))
    records: dict[str, dict[str, dict]] = {}
    for name, when, src, seed in models:
        hdir = hier.stage_dir(out, name, when)
        per_block_knn = knn if seed in full_eval else ["--no-knn"]
        stage(
            f"{name}/hierarchy_{when}",
            [py, "-m", "dino_skipless.hierarchy", *seg_args, *quick_scenes, "--ckpt", str(src),
             "--no-probe",
             *per_block_knn, "--resolution", str(res), "--batch-images", "4" if quick else "16",
             "--num-workers", "0", "--out", str(hdir), "--quiet", *dev],
            out / "logs" / name / f"hierarchy_{when}.txt",
            hdir / "results.json",
        )  # fmt: skip
        records.setdefault(name, {})[when] = hier.load_model(hdir)
    if not records:  # --only-finished before any run finished
        return {}
    any_rec = next(iter(records.values()))["end"]
    section = {
        "threshold": any_rec["cka"]["patch"]["threshold"],
        "n_images": any_rec["images"]["n_images"],
        "summary": hier.summary(results, records),
        "claims": hier.claims(results, records),
        "dirs": {f"{n}/{w}": str(hier.stage_dir(out, n, w)) for n, w, _, _ in models},
    }
    seed0 = [dict(records[n][w], label=f"{n} ({w})") for n, w, _, s in models if s == 0]
    section["per_block_knn"] = {m["label"]: m["knn"]["top1"] for m in seed0 if m.get("knn")}
    if seed0:
        from dino_skipless.hierarchy_figure import hierarchy_figure

        hierarchy_figure(seed0, [out / "hierarchy.png"])
        section["figure"] = "hierarchy.png"
    return section


def plot_curves(run_dirs: dict[str, Path], path: Path) -> Path:
    """Loss, teacher information (the collapse monitor), per-layer kappa and the online k-NN
    during pretraining; one colour per variant, one line style per training seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(21, 3.6), dpi=150)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors: dict[str, str] = {}
    styles = ["-", "--", ":", "-."]
    for name, rdir in run_dirs.items():
        group, _, seed = name.partition("_seed")
        color = colors.setdefault(group, palette[len(colors) % len(palette)])
        ls = styles[int(seed or 0) % len(styles)]
        label = group if not seed else None
        rows = read_jsonl(rdir / "log.jsonl")
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=label, color=color, ls=ls, lw=1.1)
        if rows and "teacher_entropy" in rows[0]:
            info = [r["teacher_batch_entropy"] - r["teacher_entropy"] for r in rows]
            axes[1].plot(steps, info, color=color, ls=ls, lw=1.1)
            axes[2].plot(steps, [r["teacher_entropy"] for r in rows], color=color, ls=ls, lw=1.1)
        jac = read_jsonl(rdir / "jacobian.jsonl")
        layers = sorted({r["layer"] for r in jac})
        for layer in layers:
            pts = [(r["step"], min(r["kappa"], 1e20)) for r in jac if r["layer"] == layer]
            shade = 0.35 + 0.65 * (layer + 1) / (layers[-1] + 1)  # deeper blocks darker
            axes[3].plot(*zip(*pts), color=color, ls=ls, lw=0.9, marker="o", ms=2, alpha=shade)
        knn = read_jsonl(rdir / "knn.jsonl")
        if knn:
            axes[4].plot([r["step"] for r in knn], [r["knn_top1"] for r in knn], color=color,
                         ls=ls, lw=1.1, marker="o", ms=2.5)  # fmt: skip
    axes[0].set_ylabel("DINO loss")
    axes[0].legend(fontsize=7, frameon=False, title="line style: seed 0, 1, 2", title_fontsize=6)
    axes[1].set_ylabel("target information about the image (nats)\nbatch − per-image entropy")
    axes[1].axhline(0.05, color="k", lw=0.6, ls=":")  # run.collapse_min_info
    axes[2].set_ylabel("teacher target entropy per image (nats)")
    axes[3].set_ylabel("κ(K_l K_lᵀ) per block (darker = deeper)")
    axes[3].set_yscale("log")
    axes[4].set_ylabel("online k-NN top-1 (%), held-out images")
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
            if key in rec and not 0.0 <= rec[key] <= 100.0:
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
    """Per evaluation: floor (each run's own init), ceiling, pixels, and each run with its
    paired test against its own floor and the share of the floor-to-ceiling gap it closes
    (against the ceiling of the same training seed where there is one, else seed 0's)."""
    runs, base, refs = results["runs"], results.get("baselines", {}), results.get("references", {})
    dets = sorted({k for r in runs.values() for k in r if k.startswith("tokencut_")})
    out: dict = {}
    for ev in [*EVALUATIONS, *dets]:
        ceiling_name = EVALUATIONS[ev][2] if ev in EVALUATIONS else "supervised_seg"
        e: dict = {"floor": {}, "runs": {}, "ceilings": {}}
        for fl, b in base.items():
            e["floor"][fl] = _value(b, ev)
        for name, ref in refs.items():
            if name.startswith(ceiling_name) and _value(ref, ev) is not None:
                e["ceilings"][name] = _value(ref, ev) | {"seed": ref.get("seed", 0)}
        if ceiling_name in e["ceilings"]:
            e["ceiling"] = e["ceilings"][ceiling_name] | {"model": ceiling_name}
            e["ceiling_vs_floor_skip"] = (
                paired_test(ev, refs[ceiling_name], base["skip"])
                if e["floor"].get("skip") is not None
                else None
            )
        if ev == "knn" and "pixels" in refs:
            e["pixels"] = _value(refs["pixels"], ev)
        for name, r in runs.items():
            row = _value(r, ev)
            if row is None:
                continue
            fl = r.get("floor", r["variant"])
            if e["floor"].get(fl) is not None:
                row["vs_floor"] = paired_test(ev, r, base[fl])
                cname = ceiling_name + seed_suffix(r.get("seed", 0))
                if cname not in e["ceilings"]:
                    cname = ceiling_name
                if cname in e["ceilings"]:
                    lo, hi = e["floor"][fl]["value"], e["ceilings"][cname]["value"]
                    # no room above the floor: a share of it means nothing
                    row["gap_closed"] = (row["value"] - lo) / (hi - lo) if hi > lo else None
                    if hi > lo:
                        room = (
                            e["ceiling_vs_floor_skip"]
                            if fl == "skip"
                            and cname == ceiling_name
                            and e.get("ceiling_vs_floor_skip")
                            else paired_test(ev, refs[cname], base[fl])
                        )
                        row["gap_closed_se"] = share_se(row["vs_floor"], room, hi - lo)
            row["seed"] = r.get("seed", 0)
            row["group"] = r.get("group", name)
            e["runs"][name] = row
        out[ev] = e
    return out


# The comparisons between variants that the paper's claims rest on (a beats b).
VARIANT_PAIRS = (
    ("skipless_init", "skipless"),
    ("skip", "skipless"),
    ("skipless_init", "skip"),
)


def seed_level(results: dict) -> dict:
    """Per evaluation: each model over its training seeds (``seeds.seed_rows``: mean ± s.e.,
    between-seed s.d. next to the mean within-run s.e., gain over the own init) and the
    comparisons of variants across seeds (on the final value and on the gain)."""
    out = {}
    for ev, e in results.get("evaluations", {}).items():
        per_seed: dict[str, dict[int, dict]] = {}
        for row in e["runs"].values():
            per_seed.setdefault(row["group"], {})[row["seed"]] = row
        for name, c in e.get("ceilings", {}).items():
            per_seed.setdefault(f"ceiling ({name.split('_seed')[0]})", {})[c["seed"]] = c
        floors: dict[str, dict[int, dict]] = {}
        for fl, f in e["floor"].items():
            if f is not None:
                b = results["baselines"][fl]
                floors.setdefault(b["variant"], {})[b.get("seed", 0)] = f
        comps = {}
        groups = {row["group"] for row in e["runs"].values()}
        for opt in sorted({g.rsplit("_", 1)[1] for g in groups}):
            for a, b in VARIANT_PAIRS:
                ga, gb = f"{a}_{opt}", f"{b}_{opt}"
                for what in ("value", "gain"):
                    t = compare_models(per_seed, ga, gb, what)
                    if t is not None:
                        comps[f"{ga} vs {gb} ({what})"] = t
        out[ev] = {
            "models": seed_rows(per_seed),
            "floors": seed_rows(floors),
            "comparisons": comps,
        }
    return out


def _fmt_kappa(k: float) -> str:
    return "∞" if k >= 1e16 else f"{k:.3g}"


SINGULAR = 1e10  # kappa above this: numerically singular (the paper's "∞")
# The paper's skipless_init layer kappas are 3-20 (Table 6) against ~1-1.5 for skip: we call a
# kappa below WELL_CONDITIONED "the same regime", finite but above it only "partly" fixed.
WELL_CONDITIONED = 1e3


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

    Verdicts come from the numbers alone, so the page cannot overstate what was measured.
    Claims that compare *variants* rest on training seeds when there are several
    (``results["seed_level"]``: a t-test across seeds, paired by seed); with one seed they fall
    back to the evaluation's noise of that one trained model (binomial s.e. for k-NN and
    CorLoc, the probe's bootstrap s.e. over validation images for mIoU), and say so.
    Differences smaller than ``NOISE_SE`` standard errors are "within noise". "Beats its own
    init" is a claim about one run: the paired test on the same images, per seed.
    """
    runs, base = results["runs"], results.get("baselines", {})
    sl = results.get("seed_level", {})
    n_seeds = len(results.get("seeds", [0]))
    out: list[tuple[str, str, str]] = []
    adamw = [r for r in runs.values() if r.get("optimizer") == "adamw"] or list(runs.values())
    by_seed: dict[int, dict[str, dict]] = {}
    for r in adamw:
        by_seed.setdefault(r.get("seed", 0), {})[r["variant"]] = r
    by = by_seed.get(0, {})
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

    def across_seeds(ev: str, a: str, b: str, what: str = "value") -> dict | None:
        """The seed-level test of ``a`` > ``b`` (adamw), when there are >= 2 seeds."""
        t = sl.get(ev, {}).get("comparisons", {}).get(f"{a}_adamw vs {b}_adamw ({what})")
        return t if t is not None and t.get("se") is not None else None

    def seed_evidence(ev: str, a: str, b: str, what: str, unit: str) -> str:
        rows = sl[ev]["models"]
        key = "gain" if what == "gain" else "value"
        ma, mb = rows[f"{a}_adamw"][key], rows[f"{b}_adamw"][key]
        lead = "gain over own init, " if what == "gain" else ""
        return (
            f"{lead}{unit} {a} {fmt_seed(ma)} vs {b} {fmt_seed(mb)}; difference "
            f"{fmt_test(across_seeds(ev, a, b, what))}"
        )

    variants = {"skip", "skipless", "skipless_init"}
    if variants <= by.keys():
        for when, claim in (
            ("init", "Skipless at the default init is ill-conditioned; the paper's init fixes it "
                     "(Sec. 4, Tables 5-6)"),
            ("end", "After training, skipless_init stays well conditioned; skipless does not "
                    "(Table 6)"),
        ):  # fmt: skip
            per_seed = [
                {v: max(rs[v][f"kappa_{when}"].values()) for v in variants}
                for _, rs in sorted(by_seed.items())
                if variants <= rs.keys() and all(f"kappa_{when}" in rs[v] for v in variants)
            ]
            if all(k["skipless"] > SINGULAR and k["skipless_init"] < WELL_CONDITIONED
                   for k in per_seed):  # fmt: skip
                verdict = "shown"
            elif all(k["skipless"] > SINGULAR and k["skipless_init"] < SINGULAR for k in per_seed):
                verdict = "partly shown"  # finite, but far above the paper's tens
            else:
                verdict = "not shown"

            def span(v: str, ks=per_seed) -> str:
                lo, hi = min(k[v] for k in ks), max(k[v] for k in ks)
                return _fmt_kappa(lo) if lo == hi else f"{_fmt_kappa(lo)}-{_fmt_kappa(hi)}"

            seeds_txt = f" over {len(per_seed)} seeds" if len(per_seed) > 1 else ""
            out.append((
                claim,
                verdict,
                f"max κ at {when}{seeds_txt}: skip {span('skip')}, skipless {span('skipless')}, "
                f"skipless_init {span('skipless_init')} "
                "(paper, ViT-S: skip 1.0-1.6, skipless ∞, skipless_init 2.7-22)",
            ))  # fmt: skip
    if n_seeds > 1 and "knn" in sl:
        for claim, ev, a, b, what, unit in (
            ("Removing the skips hurts: skip learns better features than skipless", "knn",
             "skip", "skipless", "value", "k-NN top-1"),
            ("The paper's init makes skipless trainable: skipless_init beats skipless", "knn",
             "skipless_init", "skipless", "value", "k-NN top-1"),
            ("skipless_init gains more from training than skip", "knn", "skipless_init", "skip",
             "gain", "k-NN"),
            ("skipless_init matches or beats skip", "knn", "skipless_init", "skip", "value",
             "k-NN top-1"),
        ):  # fmt: skip
            t = across_seeds(ev, a, b, what)
            if t is None:
                continue
            v = t["verdict"]
            if claim.endswith("matches or beats skip") and v == "within noise":
                v = "shown (a tie within seed noise)"
            out.append((f"{claim} (k-NN)", v, seed_evidence(ev, a, b, what, unit)))
    if {"skip", "skipless_init"} <= by.keys():
        s, n = by["skip"], by["skipless_init"]
        for mode, what in (("single", "single block"), ("multiscale", "multiscale")):
            key = f"linprobe_{mode}_miou"
            if key not in s or key not in n:
                continue
            claim = f"skipless_init beats skip on dense linear probing, {what} (Table 2)"
            t = across_seeds(f"linprobe_{mode}", "skipless_init", "skip")
            if t is not None:
                out.append((claim, t["verdict"],
                            seed_evidence(f"linprobe_{mode}", "skipless_init", "skip", "value",
                                          "mIoU")))  # fmt: skip
                continue
            se = miou_se(n, s, mode)
            one = " (one training seed: evaluation noise only)" if n_seeds == 1 else ""
            out.append(
                (
                    claim,
                    compare(n[key], s[key], se),
                    f"mIoU skipless_init {n[key]:.2f} vs skip {s[key]:.2f}{pm(se)}{one}",
                )
            )
        if det and det in s and det in n:
            claim = "skipless_init beats skip on TokenCut object discovery (Fig. 3)"
            t = across_seeds(det, "skipless_init", "skip")
            if t is not None:
                out.append((claim, t["verdict"],
                            seed_evidence(det, "skipless_init", "skip", "value", "CorLoc")))  # fmt: skip
            else:
                se = corloc_se(n, s)
                out.append(
                    (
                        claim,
                        compare(n[det]["corloc"], s[det]["corloc"], se),
                        f"CorLoc skipless_init {n[det]['corloc']:.1f} vs skip "
                        f"{s[det]['corloc']:.1f}{pm(se)}",
                    )
                )
    evals = results.get("evaluations", {})
    for v in sorted({r["variant"] for r in adamw}, key=["skip", "skipless", "skipless_init"].index):
        per_seed_verdicts = []
        for seed, rs in sorted(by_seed.items()):
            if v not in rs:
                continue
            r = rs[v]
            fl = r.get("floor", v)
            if fl not in base:
                continue
            b = base[fl]
            name = next(nm for nm, x in runs.items() if x is r)
            # the paired test of each evaluation against the run's own init (same images)
            # where the page has one, else the unpaired s.e. (which can only understate a gain)
            parts = []
            for label, ev, key in (("k-NN", "knn", "knn_top1"),
                                   ("mIoU", "linprobe_single", "linprobe_single_miou"),
                                   ("mIoU multiscale", "linprobe_multiscale",
                                    "linprobe_multiscale_miou")):  # fmt: skip
                if key not in r or key not in b:
                    continue
                paired = evals.get(ev, {}).get("runs", {}).get(name, {}).get("vs_floor")
                se = (
                    paired["se"]
                    if paired
                    else knn_se(r, b)
                    if ev == "knn"
                    else miou_se(r, b, ev.split("_")[1])
                )
                parts.append((label, compare(r[key], b[key], se), r[key] - b[key], se))
            if det and det in r and det in b:
                paired = evals.get(det, {}).get("runs", {}).get(name, {}).get("vs_floor")
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
            per_seed_verdicts.append((seed, verdict, parts))
        if not per_seed_verdicts:
            continue
        claim = (
            f"(precondition, not a paper claim) pretraining taught {v} something: "
            "it beats its own random init"
        )
        if len(per_seed_verdicts) == 1:
            _, verdict, parts = per_seed_verdicts[0]
            out.append((
                claim,
                verdict,
                "gain over its own init (paired s.e.): "
                + ", ".join(f"{label} {g:+.1f}{pm(se)}" for label, _, g, se in parts),
            ))  # fmt: skip
            continue
        kinds = [vd for _, vd, _ in per_seed_verdicts]
        knn_shown = sum(
            any(label == "k-NN" and vd == "shown" for label, vd, _, _ in parts)
            for _, _, parts in per_seed_verdicts
        )
        n = len(per_seed_verdicts)
        verdict = (
            kinds[0] + f" (all {n} seeds)"
            if len(set(kinds)) == 1
            else (f"k-NN shown in {knn_shown} of {n} seeds")
        )
        out.append((
            claim,
            verdict,
            "gain over its own init (paired s.e.), per seed: "
            + "; ".join(
                f"seed {seed}: "
                + ", ".join(f"{label} {g:+.1f}{pm(se)}" for label, _, g, se in parts)
                for seed, _, parts in per_seed_verdicts
            ),
        ))  # fmt: skip
    return out


def hier_claims(results: dict) -> list[dict]:
    return (results.get("hierarchy") or {}).get("claims", [])


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
        if not e.get("runs") and not any(e["floor"].values()):  # not evaluated in this world
            continue
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


def seed_level_markdown(results: dict) -> list[str]:
    """The variants over training seeds: each evaluation's table and the tests across seeds."""
    sl = results.get("seed_level")
    if not sl:
        return []
    # the seeds with at least one finished run (--only-finished may leave some out)
    seeds = sorted({r["seed"] for r in results["runs"].values()}) or results.get("seeds", [0])
    lines = [
        "",
        f"## Over training seeds ({len(seeds)}: run.seed {', '.join(map(str, seeds))})",
        "",
        "Mean over training seeds ± its s.e.; **between-seed s.d.** (how much another seed of the "
        "same recipe differs) next to the **mean within-run s.e.** (the evaluation's noise for one "
        "trained model: binomial over k-NN queries or TokenCut images, bootstrap over probe "
        "images). Gain: each run against its own initialisation (the paired test on the same "
        "images), z per seed. Floors are the runs' own inits.",
    ]
    for ev, block in sl.items():
        if not (block["floors"] or block["models"]):  # e.g. no probe on the photos world
            continue
        title = EVAL_TITLES.get(ev, f"TokenCut CorLoc (%), {ev.removeprefix('tokencut_')}")
        lines += ["", f"**{title}**", ""]
        lines += ["| model | seeds | mean ± s.e. | between-seed s.d. | within-run s.e. | "
                  "gain over own init | z per seed |", "|---|---|---|---|---|---|---|"]  # fmt: skip

        def cell(x: float | None) -> str:
            return "–" if x is None else f"{x:.2f}"

        for kind, rows in (("floor", block["floors"]), ("model", block["models"])):
            for name, r in rows.items():
                label = f"floor: {name} at its own init" if kind == "floor" else name
                v = r["value"]
                gain = r.get("gain")
                g = "–" if not gain else (
                    f"{gain['mean']:+.2f}" + (f" ± {gain['se']:.2f}" if gain["se"] is not None else "")
                )  # fmt: skip
                zs = ", ".join("–" if z is None else f"{z:.1f}" for z in r.get("per_seed_z", []))
                mean = f"{v['mean']:.2f}" + (f" ± {v['se']:.2f}" if v["se"] is not None else "")
                lines.append(
                    f"| {label} | {v['n']} | {mean} | {cell(v['sd'])} | {cell(r['within_se'])} "
                    f"| {g} | {zs or '–'} |"
                )
        tested = {n: t for n, t in block["comparisons"].items() if t["se"] is not None}
        if tested:
            lines += ["", "| comparison across seeds | difference | verdict |", "|---|---|---|"]
            for name, t in tested.items():
                lines.append(f"| {name} | {fmt_test(t)} | {t['verdict']} |")
        elif block["comparisons"]:
            lines += ["", "One training seed here: the variants are not compared across seeds."]
    return lines


def run_rows(results: dict) -> list[tuple[str, dict]]:
    runs, base = results["runs"], results.get("baselines", {})
    rows = list(runs.items()) + [(f"random init {v}", r) for v, r in base.items()]
    rows += [
        (f"{name} (ceiling)", r)
        for name, r in results.get("references", {}).items()
        if name.startswith("supervised_")
    ]
    return rows


def world_section(results: dict, rel: str) -> list[str]:
    """Another world's replication (e.g. ``OUT/photos``) summarised on this page."""
    world = results.get("world", "?")
    lines = [
        "",
        f"## Second world: {world} ([its page]({rel}/RESULTS.md))",
        "",
        f"The same recipe and variants on the **{world}** world "
        "(`dino_skipless/data/worlds.py`), "
        f"{len(results.get('seeds', [0]))} training seeds; k-NN only.",
    ]
    lines += seed_level_markdown(results)[2:]
    lines += ["", "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {c} | **{v}** | {e} |" for c, v, e in paper_claims(results)]
    return lines


def results_markdown(results: dict, out: Path | None = None) -> str:
    runs = results["runs"]
    rows = run_rows(results)
    world = results.get("world", "patterns")
    lines = [
        "# Small-scale replication" + (f": the {world} world" if world != "patterns" else ""),
        "",
        f"Recipe: `{results['config']}`"
        + (" (quick mode)" if results["quick"] else "")
        + (f", overrides `{' '.join(results['overrides'])}`" if results["overrides"] else "")
        + f", training seeds {results.get('seeds', [0])}"
        + (
            f" (every evaluation for seeds {results['full_eval_seeds']}, k-NN and κ only for the"
            " others)"
            if results.get("full_eval_seeds") not in (None, results.get("seeds"))
            else ""
        )
        + ". Generated by `scripts/replicate_small.py`; every number below is read from the"
        " stage's own `results.json` under this folder.",
    ]
    if results.get("missing"):
        lines += [
            "",
            f"**Not trained yet** (left out of every table): {', '.join(results['missing'])}.",
        ]
    lines += seed_level_markdown(results)
    lines += [
        "",
        "## The paper's claims at this scale",
        "",
        "| claim | this run | evidence |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | **{v}** | {e} |" for c, v, e in paper_claims(results)]
    lines += [f"| {c} | **{v}** | {e} |" for c, v, e in (h["row"] for h in hier_claims(results))]
    lines += [
        "",
        "## Every run: dense linear probing (mIoU, paper Table 2 layout) and k-NN",
        "",
        "mIoU ± its bootstrap standard error over the validation images; k-NN top-1 in percent"
        " (one binomial s.e. is about 100·sqrt(p(1-p)/n)); `–`: not evaluated for this seed.",
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
            (
                f"{r[f'linprobe_{m}_miou']:.2f}"
                + (
                    f" ± {r[f'linprobe_{m}_se']:.2f}"
                    if r.get(f"linprobe_{m}_se") is not None
                    else ""
                )
            )
            if f"linprobe_{m}_miou" in r
            else "–"
            for m in ("single", "multiscale")
        )
        lines.append(
            f"| {name} | {r.get('steps', '–')} | {loss} | {r['knn_top1']:.1f} | {single} | "
            f"{multi} |"
        )
    det_keys = sorted({k for r in runs.values() for k in r if k.startswith("tokencut_")})
    if det_keys:
        lines += ["", "## Object discovery (TokenCut CorLoc, best block; paper Fig. 3 layout)", ""]
        lines += ["| run | " + " | ".join(k.removeprefix("tokencut_") for k in det_keys) + " |"]
        lines += ["|---|" + "---|" * len(det_keys)]
        for name, r in rows:
            if not any(k in r for k in det_keys):
                continue
            cells = [
                f"{r[k]['corloc']:.1f} (block {r[k]['best_layer']})" if k in r else "–"
                for k in det_keys
            ]
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
    lines += hier.markdown(results.get("hierarchy") or {})
    lines += ["", "## Figures", ""]
    if results.get("pca_figure"):
        lines += ["![PCA of the last block's patch features](pca.png)", ""]
    lines += [
        "![Training curves: loss, teacher information, per-block condition numbers, online "
        "k-NN](training_curves.png)",
        "",
    ]
    if results.get("timings_s"):
        t = results["timings_s"]
        total = sum(t.values())
        train = sum(v for k, v in t.items() if k.endswith(("/pretrain", "/train")))
        lines += [
            f"Cost: {total / 60:.1f} min of stage wall time in all ({train / 60:.1f} min of "
            f"training, from each run's own `summary.json`; {(total - train) / 60:.1f} min of "
            "evaluation, a stage reused from an earlier invocation keeping the time it took "
            "then).",
            "",
        ]
    for sub in sorted(out.iterdir()) if out is not None else []:
        if sub.is_dir() and (sub / "results.json").exists() and sub.name in WORLD_CHOICES:
            lines += world_section(load_json(sub / "results.json"), sub.name)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
