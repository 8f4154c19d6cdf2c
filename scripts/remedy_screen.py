"""Low-information images: the screen behind the remedy (README, "A remedy for low-information
images"), as runs of the quickstart recipe on the digits world and their summary.

    python scripts/remedy_screen.py --runs runs/remedy --train        # train missing arms, summarise
    python scripts/remedy_screen.py --runs runs/remedy --out results/remedy   # summarise only

Every arm is ``python -m dino_skipless.pretrain --config configs/quickstart_cpu.yaml`` on the
digits world (``data.world=digits data.synthetic_size=64 data.synthetic_n=1797``) with the
overrides below; nothing else differs. Per arm the summary reads the run's own files: the
target information (``log.jsonl``: at the first logged step, its minimum and its last value),
the collapse alarm (``summary.json``), and the online k-NN monitor (``knn.jsonl``: 1,000
held-out digits against a 797-image bank; the last evaluation paired with the one at init).
A run that is cut short (``--max-epochs``-style screens were stopped by hand) is summarised as
far as it went.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from dino_skipless.dino.monitor import learned_verdict
from dino_skipless.fileio import markdown_table, write_json
from dino_skipless.replication.stages import load_json, read_jsonl

DIGITS = ["data.world=digits", "data.synthetic_size=64", "data.synthetic_n=1797"]
SHORT = ["optim.epochs=10", "monitor.knn_every=5"]
SK = "dino.centering=sinkhorn_knopp"

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
}  # fmt: skip


def command(name: str, runs: Path) -> list[str]:
    variant, overrides, _ = ARMS[name]
    return [sys.executable, "-m", "dino_skipless.pretrain", "--config",
            "configs/quickstart_cpu.yaml", "--variant", variant, *DIGITS, *overrides,
            "run.progress=false", "--out", str(runs / name)]  # fmt: skip


def summarise(run: Path) -> dict | None:
    """What one arm's files say (None: never started)."""
    log = read_jsonl(run / "log.jsonl")
    if not log:
        return None
    info = [r["teacher_info"] for r in log]
    knn = read_jsonl(run / "knn.jsonl")
    summary = load_json(run / "summary.json") if (run / "summary.json").exists() else {}
    collapse = summary.get("collapse") or {}
    # the alarm as the run logged it (log.jsonl's ``collapsed``), also for a run cut short
    alarmed = [r["step"] for r in log if r.get("collapsed")]
    rec = {
        "steps": log[-1]["step"] + 1,
        "finished": bool(summary.get("finished")),
        "info_first": info[0],
        "info_min": min(info),
        "info_last": info[-1],
        "collapsed_at_step": collapse.get("collapsed_at_step", alarmed[0] if alarmed else None),
        "collapsed_at_end": collapse.get("collapsed_at_end", bool(log[-1].get("collapsed"))),
    }
    if len(knn) >= 2:
        v = learned_verdict(knn[0], knn[-1])
        rec |= {"knn_init": v["init_top1"], "knn_last": v["final_top1"], "knn_epoch": knn[-1]["epoch"],
                "knn_diff": v["diff"], "knn_se": v["se"], "knn_z": v["z"]}  # fmt: skip
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=Path, default=Path("runs/remedy"))
    p.add_argument("--out", type=Path, default=Path("results/remedy"))
    p.add_argument("--train", action="store_true", help="train the arms that have no summary yet")
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    args = p.parse_args(argv)
    if args.train:
        for name in args.arms:
            if not (args.runs / name / "summary.json").exists():
                subprocess.run(command(name, args.runs), check=True)
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
        ])  # fmt: skip
    table = markdown_table(
        ["arm (variant)", "steps", "target info first / min / last (nats)", "collapse alarm",
         "k-NN init → last (paired)"], rows,
    )  # fmt: skip
    write_json(args.out / "screen.json", records)
    (args.out / "screen.md").write_text(
        "# Low-information images: the remedy screen\n\n" + table + "\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
