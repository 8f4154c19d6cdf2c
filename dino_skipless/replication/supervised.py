"""The paper's supervised experiment at CPU scale (Sec. 6.1, Table 1, Fig. 1): what a finished set
of ``python -m dino_skipless.classify`` runs shows, per world.

``read_runs`` gathers each run's val top-1, its smoothed training-loss curve and its cost;
``table1`` gives the paper's layout (variant x optimiser, mean ± s.e. over seeds);
``loss_table`` the training loss at fixed fractions of the run and the steps each run needs to
reach a common threshold; ``claims`` the paper's four sentences, each tested across training
seeds (paired by seed: a seed fixes the data order, the augmentations and Mixup/CutMix for every
variant and optimiser, ``stats.compare_seeds``); ``markdown`` the page section.

The loss threshold is fixed by the reference run, never by a variant: the mean over seeds of
skip + AdamW's smoothed loss at half of the run (so skip + AdamW needs about half the steps).
The loss of a step is smoothed over one epoch (Mixup and CutMix make single steps noisy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..classifier.curves import read_run, smooth
from ..stats import compare_seeds, seed_summary, verdict
from .seeds import fmt_test
from .stages import load_json

VARIANTS = ("skip", "skipless", "skipless_init")
OPTIMIZERS = ("adamw", "soap")
# Table 1 of the paper (ViT-B/16, ImageNet-1k, val top-1 %), shown beside the CPU numbers
PAPER_TABLE1 = {
    ("skip", "adamw"): 80.3, ("skip", "soap"): 80.1,
    ("skipless", "adamw"): 61.4, ("skipless", "soap"): 77.0,
    ("skipless_init", "adamw"): 78.1, ("skipless_init", "soap"): 80.8,
}  # fmt: skip
LOSS_FRACTIONS = (0.25, 0.5, 1.0)  # of the run's steps
THRESHOLD_AT = 0.5  # the threshold: skip + AdamW's loss at this fraction of the run
VARIANT_NAMES = {"skip": "skip", "skipless": "skipless", "skipless_init": "skipless + init"}


def run_name(variant: str, optimizer: str, seed: int) -> str:
    return f"{variant}_{optimizer}_seed{seed}"


@dataclass
class Run:
    variant: str
    optimizer: str
    seed: int
    top1: float
    top5: float | None
    steps: np.ndarray  # 1-based optimisation steps of the loss records
    loss: np.ndarray  # training loss smoothed over one epoch
    time_s: float | None
    cpu_s: float | None


def read_runs(run_dirs: list[Path]) -> list[Run]:
    """Finished classify runs (``summary.json`` with its last val top-1, ``log.jsonl``)."""
    out = []
    for d in run_dirs:
        curve = read_run(d)
        summary = load_json(Path(d) / "summary.json")
        spacing = float(np.median(np.diff(curve.steps))) if len(curve.steps) > 1 else 1.0
        k = max(1, round((curve.steps_per_epoch or 1) / spacing))  # records per epoch
        out.append(
            Run(curve.variant, curve.optimizer, curve.seed, float(summary["top1"]),
                summary.get("top5"), curve.steps, smooth(curve.loss, k), summary.get("time_s"),
                summary.get("cpu_s"))
        )  # fmt: skip
    return out


def by_model(runs: list[Run]) -> dict[tuple[str, str], dict[int, Run]]:
    out: dict[tuple[str, str], dict[int, Run]] = {}
    for r in runs:
        out.setdefault((r.variant, r.optimizer), {})[r.seed] = r
    return out


def loss_at(run: Run, step: float) -> float:
    """The smoothed loss at the last record at or before ``step``."""
    i = int(np.searchsorted(run.steps, step, side="right")) - 1
    return float(run.loss[max(i, 0)])


def steps_to(run: Run, threshold: float) -> int | None:
    """The first step whose smoothed loss is at or below ``threshold`` (None: never)."""
    hit = np.nonzero(run.loss <= threshold)[0]
    return int(run.steps[hit[0]]) if len(hit) else None


def table1(runs: list[Run]) -> dict[str, dict]:
    """``"variant/optimizer"`` -> seed summary of the final val top-1 (``stats.seed_summary``)."""
    return {
        f"{v}/{o}": seed_summary([r.top1 for _, r in sorted(rs.items())])
        for (v, o), rs in by_model(runs).items()
    }


def threshold(runs: list[Run]) -> float | None:
    ref = by_model(runs).get(("skip", "adamw"))
    if not ref:
        return None
    return float(np.mean([loss_at(r, THRESHOLD_AT * r.steps[-1]) for r in ref.values()]))


def loss_table(runs: list[Run]) -> dict:
    """Per model: the smoothed loss at ``LOSS_FRACTIONS`` of the run and the steps to reach the
    reference threshold (seed summaries; a run that never reaches it counts as its last step
    and is counted in ``never``)."""
    thr = threshold(runs)
    out: dict = {"threshold": thr, "models": {}}
    for (v, o), rs in by_model(runs).items():
        seeds = sorted(rs)
        row = {
            f"loss_at_{f:g}": seed_summary([loss_at(rs[s], f * rs[s].steps[-1]) for s in seeds])
            for f in LOSS_FRACTIONS
        }
        if thr is not None:
            reach = [steps_to(rs[s], thr) for s in seeds]
            row["steps_to_threshold"] = seed_summary(
                [r if r is not None else int(rs[s].steps[-1]) for r, s in zip(reach, seeds)]
            )
            row["never"] = sum(r is None for r in reach)
        row["total_steps"] = int(max(rs[s].steps[-1] for s in seeds))
        out["models"][f"{v}/{o}"] = row
    return out


def _top1(runs, v, o) -> dict[int, float] | None:
    rs = by_model(runs).get((v, o))
    return {s: r.top1 for s, r in rs.items()} if rs else None


def _recovery(runs, v: str, o: str) -> dict[int, float] | None:
    """Per seed: what ``v``/``o`` recovers of the AdamW gap (skip − skipless) beyond half of
    it, in top-1 points: (x − skipless) − ½ (skip − skipless). > 0: more than half recovered."""
    x, sl, sk = _top1(runs, v, o), _top1(runs, "skipless", "adamw"), _top1(runs, "skip", "adamw")
    if not (x and sl and sk):
        return None
    seeds = sorted(set(x) & set(sl) & set(sk))
    return {s: (x[s] - sl[s]) - 0.5 * (sk[s] - sl[s]) for s in seeds}


def _share(runs, v: str, o: str) -> float | None:
    x, sl, sk = _top1(runs, v, o), _top1(runs, "skipless", "adamw"), _top1(runs, "skip", "adamw")
    if not (x and sl and sk):
        return None
    gap = np.mean(list(sk.values())) - np.mean(list(sl.values()))
    return float((np.mean(list(x.values())) - np.mean(list(sl.values()))) / gap) if gap else None


def _claim(text: str, paper: str, a: dict | None, b: dict | None, what: str) -> dict:
    if not a or not b:
        return {"claim": text, "verdict": "untested (runs missing)", "evidence": what,
                "paper": paper, "test": None}  # fmt: skip
    t = compare_seeds(a, b)
    return {"claim": text, "verdict": verdict(t["diff"], t["se"], t["p"]),
            "evidence": f"{what}: {fmt_test(t)}", "paper": paper, "test": t}  # fmt: skip


def claims(runs: list[Run]) -> list[dict]:
    """The paper's four sentences about Table 1, each a test across training seeds (top-1)."""
    out = [
        _claim(
            "removing the skips hurts with AdamW", "80.3 vs 61.4",
            _top1(runs, "skip", "adamw"), _top1(runs, "skipless", "adamw"),
            "skip − skipless (AdamW), top-1 points",
        )
    ]  # fmt: skip
    for v, o, text, paper in (
        ("skipless", "soap", "SOAP recovers much of it (more than half of the AdamW gap)",
         "77.0: 83 % of the gap"),
        ("skipless_init", "adamw", "the init recovers most of it (more than half of the AdamW "
         "gap)", "78.1: 88 % of the gap"),
    ):  # fmt: skip
        rec = _recovery(runs, v, o)
        share = _share(runs, v, o)
        c = _claim(
            text, paper, rec, {s: 0.0 for s in rec} if rec else None,
            f"{VARIANT_NAMES[v]} ({o}) recovers "
            + (f"{100 * share:.0f} %" if share is not None else "?")
            + " of the gap; (recovered − half the gap), top-1 points",
        )  # fmt: skip
        c["share"] = share
        out.append(c)
    c = _claim(
        "init + SOAP matches or beats skip", "80.8 vs 80.1 (skip, SOAP) and 80.3 (AdamW)",
        _top1(runs, "skipless_init", "soap"), _top1(runs, "skip", "soap"),
        "skipless + init (SOAP) − skip (SOAP), top-1 points",
    )  # fmt: skip
    # "matches" is what a test cannot show: no significant difference is reported as such
    if c["verdict"] == "within noise":
        c["verdict"] = "within noise (consistent with 'matches')"
    elif c["verdict"] == "shown":
        c["verdict"] = "shown (beats)"
    out.append(c)
    return out


def _fmt(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "–"
    if s["se"] is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['se']:.{digits}f}"


def markdown(world: str, runs: list[Run], figure: str | None = None) -> list[str]:
    """A world's section: Table 1 layout, the loss table, the claims, the figure, the cost."""
    t1, lt = table1(runs), loss_table(runs)
    n_seeds = sorted({len(rs) for rs in by_model(runs).values()})
    lines = [
        f"## World: {world}",
        "",
        f"Val top-1 (%), mean ± s.e. over training seeds ({'/'.join(map(str, n_seeds))} per "
        "run); the paper's ViT-B/16 ImageNet numbers in brackets.",
        "",
        "| | AdamW | SOAP |",
        "|---|---|---|",
    ]
    for v in VARIANTS:
        cells = [f"{_fmt(t1.get(f'{v}/{o}'))} [{PAPER_TABLE1[(v, o)]}]" for o in OPTIMIZERS]
        lines.append(f"| {VARIANT_NAMES[v]} | " + " | ".join(cells) + " |")
    fr = [f"loss at {int(100 * f)} %" for f in LOSS_FRACTIONS]
    thr = lt["threshold"]
    lines += [
        "",
        "Training loss (smoothed over one epoch; mean ± s.e. over seeds) at fixed fractions of "
        "the run, and the steps to reach "
        + (f"**{thr:.3f}**, " if thr is not None else "the threshold, ")
        + "the loss skip + AdamW has at half of its run (a run that never reaches it counts "
        "as its last step):",
        "",
        "| run | " + " | ".join(fr) + " | steps to threshold | never reached |",
        "|---|" + "---|" * (len(fr) + 2),
    ]
    for o in OPTIMIZERS:
        for v in VARIANTS:
            m = lt["models"].get(f"{v}/{o}")
            if not m:
                continue
            cells = [_fmt(m[f"loss_at_{f:g}"], 3) for f in LOSS_FRACTIONS]
            st = m.get("steps_to_threshold")
            cells += [f"{_fmt(st, 0)} of {m['total_steps']}" if st else "–",
                      str(m.get("never", "–"))]  # fmt: skip
            lines.append(f"| {VARIANT_NAMES[v]}, {o} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| the paper's claim (Table 1) | this scale | evidence (paired t across seeds) | paper |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c['claim']} | **{c['verdict']}** | {c['evidence']} | {c['paper']} |"
        for c in claims(runs)
    ]
    if figure:
        lines += ["", f"![Fig. 1 layout: training loss, mean over seeds ± s.e.]({figure})"]
    cpu = [r.cpu_s for r in runs if r.cpu_s]
    wall = [r.time_s for r in runs if r.time_s]
    if wall:
        lines += [
            "",
            f"Cost: {len(runs)} runs, {sum(wall) / 60:.1f} min of wall time"
            + (f", {sum(cpu) / 60:.1f} min of training-process CPU time" if cpu else "")
            + " (from each run's `summary.json`).",
        ]
    return lines


def record(runs: list[Run]) -> dict:
    """The JSON of a world: Table 1, the loss table, the claims and every run's numbers."""
    return {
        "table1": table1(runs),
        "loss": loss_table(runs),
        "claims": claims(runs),
        "runs": {
            run_name(r.variant, r.optimizer, r.seed): {
                "top1": r.top1,
                "top5": r.top5,
                "final_loss": float(r.loss[-1]),
                "steps": int(r.steps[-1]),
                "time_s": r.time_s,
                "cpu_s": r.cpu_s,
            }
            for r in runs
        },  # fmt: skip
    }
