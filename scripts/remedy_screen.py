"""Low-information images: the screen behind the remedy (README, "A remedy for low-information
images"), as runs of the quickstart recipe on the digits world and their summary.

    python scripts/remedy_screen.py --runs runs/remedy --train        # train missing arms, summarise
    python scripts/remedy_screen.py --runs runs/remedy --out results/remedy   # summarise only
    python scripts/remedy_screen.py --out results/remedy --patterns runs/patterns_remedy_pair_t01 \
        --remedy pair_t01 --train      # does the remedy lose anything on patterns? (--seeds 3)

Every arm is ``python -m dino_skipless.pretrain --config configs/quickstart_cpu.yaml`` on the
digits world (``data.world=digits data.synthetic_size=64 data.synthetic_n=1797``) with the
overrides below; nothing else differs. Per arm the summary reads the run's own files: the
target information (``log.jsonl``: at the first logged step, its minimum and its last value),
the collapse alarm (``summary.json``), and the online k-NN monitor (``knn.jsonl``: 1,000
held-out digits against a 797-image bank; the last evaluation paired with the one at init).
A run that is cut short (stopped by hand, or at the collapse alarm with
``run.on_collapse=stop``) is summarised as far as it went.

``--patterns``: a remedy (``--remedy``, one of ``REMEDIES``) on the pattern world, one run per
variant and seed (``VARIANT/seed{s}/``, trained with ``--train``), against the replication's
run of the same
variant and seed (``--baseline``: ``VARIANT_adamw`` for seed 0, ``..._seed{s}`` after). Both
runs of a seed start from the same weights and score the same held-out images, so each seed
gets an exact McNemar test (remedy vs published loss, final k-NN), and the seeds a paired t-test.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from dino_skipless.dino.monitor import learned_verdict
from dino_skipless.fileio import markdown_table, write_report
from dino_skipless.replication.stages import load_json, read_jsonl
from dino_skipless.stats import compare_seeds, verdict

DIGITS = ["data.world=digits", "data.synthetic_size=64", "data.synthetic_n=1797"]
SHORT = ["optim.epochs=10", "monitor.knn_every=5"]
SK = "dino.centering=sinkhorn_knopp"
KO = "dino.koleo_weight=0.1"
T02 = ["dino.teacher_temp=0.02", "dino.warmup_teacher_temp=0.02"]
T01 = ["dino.teacher_temp=0.01", "dino.warmup_teacher_temp=0.01"]
STOP = "run.on_collapse=stop"  # screen arms: a collapsed arm stops at the alarm
# DINOv2's pair, and the pair with a sharper teacher (T 0.01: the remedy the screen chose;
# README, "A remedy for low-information images"); --remedy picks what the pattern check runs.
REMEDIES = {"pair": [KO, SK], "pair_t02": [KO, SK, *T02], "pair_t01": [KO, SK, *T01]}
REMEDY = "pair_t01"
# the replication's pattern-world runs (scripts/replicate_small.py), which the remedy must match
PATTERNS = ["run.jacobian_every_epochs=24", "run.on_nonfinite=skip"]

# name -> (variant, overrides, what it tests)
ARMS: dict[str, tuple[str, list[str], str]] = {
    "dg10_centering": ("skip", SHORT, "published (centring, T 0.04)"),
    "dg10_sinkhorn_knopp": ("skip", [*SHORT, SK], "Sinkhorn-Knopp, T 0.04"),
    "dg10t01_centering": ("skip", [*SHORT, "dino.teacher_temp=0.01",
                                   "dino.warmup_teacher_temp=0.01"], "centring, T 0.01"),
    "dg10t01_sinkhorn_knopp": ("skip", [*SHORT, SK, "dino.teacher_temp=0.01",
                                        "dino.warmup_teacher_temp=0.01"], "Sinkhorn-Knopp, T 0.01"),
    "dgsk256_0.04": ("skip", [*SHORT, SK, "dino.out_dim=256"], "Sinkhorn-Knopp, K 256, T 0.04"),
    "dgsk256_0.01": ("skip", [*SHORT, SK, "dino.out_dim=256", "dino.teacher_temp=0.01",
                              "dino.warmup_teacher_temp=0.01"], "Sinkhorn-Knopp, K 256, T 0.01"),
    "digits_published": ("skipless_init", [], "published (centring, T 0.04), 48 epochs"),
    "digits_remedy": ("skipless_init", ["dino.teacher_temp_min_info=1.0"],
                      "T calibrated to 1 nat at the start (T 0.0084), 48 epochs"),
    "dg10_bn_c": ("skipless_init", [*SHORT, "dino.use_bn_in_head=true"], "BatchNorm in the head"),
    "dg10_bn_sk": ("skipless_init", [*SHORT, "dino.use_bn_in_head=true", SK],
                   "BatchNorm in the head + Sinkhorn-Knopp"),
    "dg10_ko_c": ("skipless_init", [*SHORT, "dino.koleo_weight=0.1"], "KoLeo 0.1 (DINOv2's)"),
    "dg10_ko_sk": ("skipless_init", [*SHORT, "dino.koleo_weight=0.1", SK],
                   "KoLeo 0.1 + Sinkhorn-Knopp (DINOv2's pair)"),
    "dg10_ko1_c": ("skipless_init", [*SHORT, "dino.koleo_weight=1.0"], "KoLeo 1.0"),
    "dg10_ko1_sk": ("skipless_init", [*SHORT, "dino.koleo_weight=1.0", SK],
                    "KoLeo 1.0 + Sinkhorn-Knopp"),
    "digits_koleo01_sk": ("skipless_init", ["dino.koleo_weight=0.1", SK],
                          "KoLeo 0.1 + Sinkhorn-Knopp (DINOv2's pair), 48 epochs"),
    "digits_remedy_final": ("skipless_init", ["dino.koleo_weight=1.0", SK],
                            "KoLeo 1.0 + Sinkhorn-Knopp, 48 epochs"),
    "dgp_nolocal": ("skipless_init", [KO, SK, "aug.n_local=0", STOP],
                    "pair, 2 global views only (no local crops), 48 epochs"),
    "dgp_mom996": ("skipless_init", [KO, SK, "dino.momentum_teacher=0.996", STOP],
                   "pair, teacher EMA 0.996, 48 epochs"),
    "dgp_lr3e-4": ("skipless_init", [KO, SK, "optim.lr=0.0003", STOP],
                   "pair, lr 3e-4 (0.3x), 48 epochs"),
    "dgp_kb": ("skipless_init", [KO, SK, "dino.koleo_features=bottleneck", STOP],
               "pair with KoLeo on the head's bottleneck, 48 epochs"),
    "dgp_t02": ("skipless_init", [KO, SK, *T02, STOP],
                "pair + teacher T 0.02, 48 epochs"),
    "dgp_t02_s1": ("skipless_init", [KO, SK, *T02, "run.seed=1"],
                   "pair + teacher T 0.02, 48 epochs, seed 1"),
    "dgp_t02_s2": ("skipless_init", [KO, SK, *T02, "run.seed=2"],
                   "pair + teacher T 0.02, 48 epochs, seed 2"),
    "dgp_t02_s3": ("skipless_init", [KO, SK, *T02, "run.seed=3"],
                   "pair + teacher T 0.02, 48 epochs, seed 3"),
    "dgp_t02_s4": ("skipless_init", [KO, SK, *T02, "run.seed=4"],
                   "pair + teacher T 0.02, 48 epochs, seed 4"),
    "dgp_t01_s3": ("skipless_init", [KO, SK, *T01, "run.seed=3", STOP],
                   "pair + teacher T 0.01 (the remedy), 48 epochs, seed 3"),
    "dgp_t01_s2": ("skipless_init", [KO, SK, *T01, "run.seed=2", STOP],
                   "pair + teacher T 0.01 (the remedy), 48 epochs, seed 2"),
    "dgp_t01_s0": ("skipless_init", [KO, SK, *T01, "run.seed=0", STOP],
                   "pair + teacher T 0.01 (the remedy), 48 epochs, seed 0"),
    "dgp_t01_s1": ("skipless_init", [KO, SK, *T01, "run.seed=1", STOP],
                   "pair + teacher T 0.01 (the remedy), 48 epochs, seed 1"),
    "dgp_t01_s4": ("skipless_init", [KO, SK, *T01, "run.seed=4", STOP],
                   "pair + teacher T 0.01 (the remedy), 48 epochs, seed 4"),
    # which part of the remedy does the work: each half of the pair with the sharper teacher
    "dgt01_sk_s0": ("skipless_init", [SK, *T01, "run.seed=0", STOP],
                    "Sinkhorn-Knopp + teacher T 0.01 (no KoLeo), 48 epochs, seed 0"),
    "dgt01_ko_s0": ("skipless_init", [KO, *T01, "run.seed=0", STOP],
                    "KoLeo 0.1 + teacher T 0.01 (centring), 48 epochs, seed 0"),
    "dgt01_c_s0": ("skipless_init", [*T01, "run.seed=0", STOP],
                   "teacher T 0.01 alone (centring, no KoLeo), 48 epochs, seed 0"),
    # the other variant
    "digits_published_skip": ("skip", [STOP], "published (centring, T 0.04), 48 epochs"),
    **{f"dgp_t01_skip_s{s}": ("skip", [KO, SK, *T01, f"run.seed={s}", STOP],
                              f"pair + teacher T 0.01 (the remedy), 48 epochs, seed {s}")
       for s in range(3)},
}  # fmt: skip
KNN = "knn.jsonl"
# arms that are training seeds of one recipe: summarised across seeds (seed -> arm)
SEED_GROUPS = {
    "pair + teacher T 0.02": {
        0: "dgp_t02",
        **{s: f"dgp_t02_s{s}" for s in range(1, 5)},
    },
    "pair + teacher T 0.01 (the remedy)": {s: f"dgp_t01_s{s}" for s in range(5)},
    "pair + teacher T 0.01 (the remedy), skip": {s: f"dgp_t01_skip_s{s}" for s in range(3)},
}


def command(name: str, runs: Path) -> list[str]:
    variant, overrides, _ = ARMS[name]
    return [sys.executable, "-m", "dino_skipless.pretrain", "--config",
            "configs/quickstart_cpu.yaml", "--variant", variant, *DIGITS, *overrides,
            "run.progress=false", "--out", f"runs/remedy/{name}"]  # fmt: skip


def patterns_command(seed: int, variant: str = "skipless_init", remedy: str = REMEDY) -> list[str]:
    return [sys.executable, "-m", "dino_skipless.pretrain", "--config",
            "configs/quickstart_cpu.yaml", "--variant", variant, *PATTERNS,
            f"run.seed={seed}", *REMEDIES[remedy], "run.progress=false", "--out",
            f"runs/patterns_remedy_{remedy}/{variant}/seed{seed}"]  # fmt: skip


def _fmt_test(t: dict) -> str:
    if t["z"] is None:
        return f"{t['diff']:+.2f} (identical)"
    return f"{t['diff']:+.2f} ± {t['se']:.2f} (z {t['z']:.1f}, p {t['p']:.2g})"


def pattern_check(
    remedy_runs: Path,
    baseline_runs: Path,
    seeds: list[int],
    variants: list[str],
    remedy: str = REMEDY,
) -> tuple[dict, str]:
    """The remedy against the published loss on the pattern world, per variant and seed (the
    online k-NN monitor's last evaluation; both runs of a seed share the init and the queries,
    so each seed gets an exact McNemar test), then across seeds (paired t-test by seed)."""
    rows, record = [], {"remedy": REMEDIES[remedy], "variants": {}}
    finals: dict[str, dict[str, dict[int, float]]] = {}
    for variant in variants:
        per_seed: dict[int, dict] = {}
        for seed in seeds:
            rem = remedy_runs / variant / f"seed{seed}"
            base = baseline_runs / (f"{variant}_adamw" + (f"_seed{seed}" if seed else ""))
            if not all((d / "summary.json").exists() for d in (rem, base)):
                continue
            kr, kb = read_jsonl(rem / KNN), read_jsonl(base / KNN)
            if kr[0]["knn_hits"] != kb[0]["knn_hits"]:
                raise SystemExit(f"seed {seed}: {rem} and {base} do not start from the same init")
            vs = learned_verdict(kb[-1], kr[-1])  # remedy (final) against published (final)
            own = {k: learned_verdict(v[0], v[-1]) for k, v in (("remedy", kr), ("published", kb))}
            alarm = (load_json(rem / "summary.json").get("collapse") or {}).get("collapsed_at_step")
            per_seed[seed] = {"remedy_top1": vs["final_top1"], "published_top1": vs["init_top1"],
                              "init_top1": own["remedy"]["init_top1"], "remedy_vs_published": vs,
                              "own_init": own, "remedy_collapsed_at_step": alarm,
                              "command": " ".join(["python", *patterns_command(seed, variant, remedy)[1:]])}  # fmt: skip
            for k, top1 in (("remedy", vs["final_top1"]), ("published", vs["init_top1"])):
                finals.setdefault(k, {}).setdefault(variant, {})[seed] = top1
            rows.append([
                variant, seed, f"{own['remedy']['init_top1']:.2f}",
                f"{vs['init_top1']:.2f} ({own['published']['diff']:+.1f}, z {own['published']['z']:.1f})",
                f"{vs['final_top1']:.2f} ({own['remedy']['diff']:+.1f}, z {own['remedy']['z']:.1f})",
                _fmt_test(vs), "–" if alarm is None else f"step {alarm}",
            ])  # fmt: skip
        rec: dict = {"per_seed": per_seed}
        if len(per_seed) >= 2:
            rec["across_seeds"] = compare_seeds(
                finals["remedy"][variant], finals["published"][variant]
            )
        record["variants"][variant] = rec
    text = f"# The remedy on the pattern world: {' '.join(REMEDIES[remedy])}\n\n" + markdown_table(
        ["variant", "seed", "own init", "published loss (gain, z)", "remedy (gain, z)",
         "remedy − published (McNemar)", "remedy's collapse alarm"], rows,
    )  # fmt: skip
    lines = []
    for variant, rec in record["variants"].items():
        c = rec.get("across_seeds")
        if c:
            lines.append(
                f"- {variant}, across {c['n']} seeds ({c['test']}): remedy − published k-NN "
                f"{c['diff']:+.2f} ± {c['se']:.2f}, t {c['t']:.2f}, p {c['p']:.2g}"
            )
    for loss, by_variant in finals.items():  # the variants' order under each loss
        if {"skip", "skipless_init"} <= set(by_variant):
            c = compare_seeds(by_variant["skipless_init"], by_variant["skip"])
            record[f"skipless_init_vs_skip_{loss}"] = c
            if c["se"] is not None:
                lines.append(
                    f"- {loss} loss, skipless_init − skip ({c['test']}): k-NN {c['diff']:+.2f} ± "
                    f"{c['se']:.2f}, p {c['p']:.2g} ({verdict(c['diff'], c['se'], c['p'])})"
                )
    if lines:
        text += "\n\n" + "\n".join(lines)
    return record, text + "\n"


def summarise(run: Path) -> dict | None:
    """What one arm's files say (None: never started)."""
    log = read_jsonl(run / "log.jsonl")
    if not log:
        return None
    info = [r["teacher_info"] for r in log]
    knn = read_jsonl(run / "knn.jsonl")
    summary = load_json(run / "summary.json") if (run / "summary.json").exists() else {}
    collapse = summary.get("collapse") or {}
    # the alarm as the run logged it (log.jsonl's ``collapsed``; log.txt's message for a run
    # stopped by it, run.on_collapse=stop, which ends before the step is logged)
    alarmed = [r["step"] for r in log if r.get("collapsed")]
    text = (run / "log.txt").read_text() if (run / "log.txt").exists() else ""
    alarmed += [int(m) for m in re.findall(r"DINO COLLAPSE at step (\d+)", text)]
    rec = {
        "steps": log[-1]["step"] + 1,
        "finished": bool(summary.get("finished")),
        "info_first": info[0],
        "info_min": min(info),
        "info_last": info[-1],
        "collapsed_at_step": collapse.get("collapsed_at_step", min(alarmed) if alarmed else None),
        "collapsed_at_end": collapse.get("collapsed_at_end", bool(log[-1].get("collapsed"))),
    }
    if len(knn) >= 2:
        v = learned_verdict(knn[0], knn[-1])
        rec |= {"knn_init": v["init_top1"], "knn_last": v["final_top1"], "knn_epoch": knn[-1]["epoch"],
                "knn_diff": v["diff"], "knn_se": v["se"], "knn_z": v["z"]}  # fmt: skip
        # the best evaluation after init: a run that learns early and then collapses shows here
        peak = max(knn[1:], key=lambda r: r["knn_top1"])
        rec |= {"knn_peak": peak["knn_top1"], "knn_peak_epoch": peak["epoch"]}
    return rec


def seed_lines(records: dict) -> list[str]:
    """Per ``SEED_GROUPS`` recipe with >= 2 finished seeds: the k-NN gain over each run's own
    init across seeds (paired t by seed), how many runs learned (>= 3 s.e., each run's McNemar
    test) and how many raised the collapse alarm. Stored in ``records["seeds"]``."""
    lines, out = [], {}
    for what, arms in SEED_GROUPS.items():
        recs = {s: records[a] for s, a in arms.items() if a in records and records[a]["finished"]}
        # a seed stopped at the alarm (run.on_collapse=stop) did not learn; it has no final k-NN
        stopped = [s for s, a in arms.items() if a in records and not records[a]["finished"]
                   and records[a]["collapsed_at_step"] is not None]  # fmt: skip
        if len(recs) < 2:
            continue
        c = compare_seeds({s: r["knn_last"] for s, r in recs.items()},
                          {s: r["knn_init"] for s, r in recs.items()})  # fmt: skip
        learned = sum(r["knn_z"] is not None and r["knn_z"] >= 3 for r in recs.values())
        alarms = sum(r["collapsed_at_step"] is not None for r in recs.values())
        out[what] = c | {"learned": learned, "alarms": alarms, "seeds": sorted(recs),
                         "stopped_at_alarm": stopped}  # fmt: skip
        n = len(recs) + len(stopped)
        lines.append(
            f"- {what}, {len(recs)} finished training seeds: k-NN gain over its own init "
            f"{c['diff']:+.1f} ± {c['se']:.1f} ({c['test']}, t {c['t']:.2f}, p {c['p']:.2g}); "
            f"learned (>= 3 s.e.) in {learned} of {n}; collapse alarm in {alarms + len(stopped)}"
            + (f" ({len(stopped)} stopped at it: seeds {stopped})" if stopped else "")
        )
    if out:
        records["seeds"] = out
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=Path, default=Path("runs/remedy"))
    p.add_argument("--out", type=Path, default=Path("results/remedy"))
    p.add_argument("--train", action="store_true", help="train the arms that have no summary yet")
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    p.add_argument(
        "--patterns",
        type=Path,
        default=None,
        help="the pattern-world check instead: runs of the remedy, one seed{s}/ each",
    )
    p.add_argument("--baseline", type=Path, default=Path("results/small_scale/runs"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["skipless_init", "skip"])
    p.add_argument("--remedy", choices=list(REMEDIES), default=REMEDY)
    args = p.parse_args(argv)
    if args.patterns is not None:
        seeds = list(range(args.seeds))
        if args.train:
            for v in args.variants:
                for s in seeds:
                    run = args.patterns / v / f"seed{s}"
                    if not (run / "summary.json").exists():
                        cmd = patterns_command(s, v, args.remedy)
                        subprocess.run([*cmd[:-1], str(run)], check=True)
        record, text = pattern_check(
            args.patterns, args.baseline, seeds, args.variants, args.remedy
        )
        write_report(args.out / f"patterns_{args.remedy}", record, text)
        print(text)
        return 0
    if args.train:
        for name in args.arms:
            if not (args.runs / name / "summary.json").exists():
                subprocess.run([*command(name, args.runs)[:-1], str(args.runs / name)], check=True)
    rows, records = [], {}
    for name in args.arms:
        rec = summarise(args.runs / name)
        if rec is None:
            continue
        variant, overrides, what = ARMS[name]
        records[name] = rec | {"variant": variant, "what": what,
                               "command": " ".join(["python", *command(name, args.runs)[1:]])}  # fmt: skip
        alarm = rec["collapsed_at_step"]
        knn = (
            f"{rec['knn_init']:.1f} → {rec['knn_last']:.1f} (ep {rec['knn_epoch']}; "
            f"{rec['knn_diff']:+.1f} ± {rec['knn_se']:.1f}, z {rec['knn_z']:.1f})"
            if "knn_last" in rec and rec["knn_z"] is not None
            else "–"
        )
        rows.append([
            f"{what} ({variant})",
            f"{rec['steps']}" + ("" if rec["finished"] else " (stopped)"),
            f"{rec['info_first']:.2f} / {rec['info_min']:.3f} / {rec['info_last']:.3f}",
            "–" if alarm is None else f"step {alarm}" + (" (to the end)" if rec["collapsed_at_end"] else ""),
            knn,
            f"{rec['knn_peak']:.1f} (ep {rec['knn_peak_epoch']})" if "knn_peak" in rec else "–",
        ])  # fmt: skip
    table = markdown_table(
        ["arm (variant)", "steps", "target info first / min / last (nats)", "collapse alarm",
         "k-NN init → last (paired)", "k-NN best (epoch)"], rows,
    )  # fmt: skip
    lines = seed_lines(records)
    text = table + ("\n\n" + "\n".join(lines) if lines else "")
    write_report(
        args.out / "screen",
        records,
        "# Low-information images: the remedy screen\n\n" + text + "\n",
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
