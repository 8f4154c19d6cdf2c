"""Fig. 1 of the paper: training-loss curves of supervised runs, one panel per optimiser.

``read_run`` reads a run folder of ``python -m dino_skipless.classify`` (``config.yaml`` for the
variant, optimiser and seed; ``log.jsonl`` for the loss; ``summary.json`` or ``epochs.jsonl`` for
the steps per epoch). ``group_runs`` groups runs by (optimiser, variant); ``mean_band`` averages a
group's seeds on the steps they all logged and gives a band (± one standard error of the mean
by default, or ± one standard deviation, or min-max); ``plot_loss_curves`` draws the paper's
layout: AdamW left, SOAP right, one curve per variant, the band shaded when a group has
several seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from ..dino.runlog import read_jsonl  # noqa: E402

OPTIMIZER_PANELS = ("adamw", "soap")  # Fig. 1: AdamW (left), SOAP (right)
PANEL_TITLES = {"adamw": "AdamW", "soap": "SOAP"}
VARIANT_ORDER = ("skip", "skipless", "skipless_init")
VARIANT_LABELS = {"skip": "skip", "skipless": "skipless", "skipless_init": "skipless + our init"}
VARIANT_COLORS = {"skip": "tab:blue", "skipless": "tab:red", "skipless_init": "tab:green"}
BANDS = ("se", "sd", "range")


class CurvesError(ValueError):
    """A run folder that cannot be plotted (the message names it and what is missing)."""


@dataclass
class RunCurve:
    path: str
    variant: str
    optimizer: str
    seed: int
    steps: np.ndarray  # optimisation steps done at each record (1-based)
    loss: np.ndarray  # mean training loss since the previous record
    steps_per_epoch: int | None = None


def read_run(run_dir: str | Path) -> RunCurve:
    run = Path(run_dir)
    cfg_file, log_file = run / "config.yaml", run / "log.jsonl"
    for f in (cfg_file, log_file):
        if not f.is_file():
            raise CurvesError(
                f"{run}: no {f.name} (expected a run folder of python -m dino_skipless.classify)"
            )
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    try:
        variant, opt = cfg["model"]["variant"], cfg["optim"]["optimizer"]
        seed = int(cfg["run"]["seed"])
    except (KeyError, TypeError):
        raise CurvesError(f"{cfg_file}: no model.variant / optim.optimizer / run.seed") from None
    points = [(int(r["step"]) + 1, _loss(r)) for r in read_jsonl(log_file)]
    points = [(s, v) for s, v in points if v is not None]  # skipped (non-finite) steps
    if not points:
        raise CurvesError(f"{log_file}: no logged loss yet")
    steps, loss = (np.array(v) for v in zip(*points))
    return RunCurve(str(run), variant, opt, seed, steps, loss, _steps_per_epoch(run))


def _loss(record: dict) -> float | None:
    """The record's mean loss since the previous one (its own step's in older logs)."""
    v = record.get("loss_mean", record.get("loss"))
    return float(v) if isinstance(v, int | float) else None  # non-finite ones are strings


def _steps_per_epoch(run: Path) -> int | None:
    summary = run / "summary.json"
    if summary.is_file():
        n = json.loads(summary.read_text()).get("steps_per_epoch")
        if n:
            return int(n)
    for r in read_jsonl(run / "epochs.jsonl"):
        if r.get("epoch"):
            return int(r["step"]) // int(r["epoch"])
    return None


def group_runs(runs: list[RunCurve]) -> dict[tuple[str, str], list[RunCurve]]:
    """``{(optimizer, variant): [runs, by seed]}``; two runs of a group with one seed are refused
    (the same run given twice, or two recipes mixed)."""
    groups: dict[tuple[str, str], list[RunCurve]] = {}
    for r in runs:
        groups.setdefault((r.optimizer, r.variant), []).append(r)
    for key, rs in groups.items():
        seeds = [r.seed for r in rs]
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            paths = [r.path for r in rs if r.seed in dup]
            raise CurvesError(
                f"{key[0]}/{key[1]}: several runs with seed {dup[0]} ({', '.join(paths)}); give "
                "one run per seed"
            )
        rs.sort(key=lambda r: r.seed)
    return groups


def smooth(y: np.ndarray, k: int) -> np.ndarray:
    """Trailing moving average over ``k`` records (the first ``k - 1`` over what exists)."""
    if k <= 1:
        return y
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(i - k, 0)
    return (c[i] - c[lo]) / (i - lo)


@dataclass
class Band:
    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: int  # seeds
    seeds: list[int] = field(default_factory=list)
    truncated: bool = False  # some seeds logged further than the others


def mean_band(runs: list[RunCurve], band: str = "se", k: int = 1) -> Band:
    """The seeds' mean on the steps all of them logged, and the band around it: ``se`` = ± one
    standard error of the mean (sd / sqrt(n), sd with n - 1), ``sd`` = ± one standard
    deviation, ``range`` = min-max. One seed: lo = hi = mean."""
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, got {band!r}")
    common = set(runs[0].steps.tolist())
    for r in runs[1:]:
        common &= set(r.steps.tolist())
    steps = np.array(sorted(common))
    if len(steps) == 0:
        raise CurvesError(
            f"runs {', '.join(r.path for r in runs)} share no logged step (run.log_every differs?)"
        )
    ys = np.stack([smooth(r.loss, k)[np.isin(r.steps, steps)] for r in runs])
    mean = ys.mean(0)
    if len(runs) == 1:
        lo = hi = mean
    elif band == "range":
        lo, hi = ys.min(0), ys.max(0)
    else:
        sd = ys.std(0, ddof=1)
        half = sd / np.sqrt(len(runs)) if band == "se" else sd
        lo, hi = mean - half, mean + half
    truncated = any(len(r.steps) != len(steps) for r in runs)
    return Band(steps, mean, lo, hi, len(runs), [r.seed for r in runs], truncated)


def plot_loss_curves(
    groups: dict[tuple[str, str], list[RunCurve]],
    out: str | Path,
    *,
    x: str = "epoch",
    band: str = "se",
    k: int = 1,
    title: str | None = None,
) -> dict:
    """Draw Fig. 1 into ``out`` (PNG, or PDF by suffix); returns what was drawn (numbers)."""
    out = Path(out)
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4), dpi=150, sharey=True)
    drawn: dict = {}
    for ax, opt in zip(axes, OPTIMIZER_PANELS):
        ax.set_title(PANEL_TITLES[opt])
        variants = [v for v in VARIANT_ORDER if (opt, v) in groups]
        variants += sorted(v for (o, v) in groups if o == opt and v not in VARIANT_ORDER)
        for v in variants:
            runs = groups[(opt, v)]
            b = mean_band(runs, band, k)
            spe = {r.steps_per_epoch for r in runs}
            per_epoch = x == "epoch" and len(spe) == 1 and None not in spe
            xs = b.steps / spe.pop() if per_epoch else b.steps
            color = VARIANT_COLORS.get(v)
            label = VARIANT_LABELS.get(v, v) + (f" ({b.n} seeds)" if b.n > 1 else "")
            ax.plot(xs, b.mean, color=color, lw=1.2, label=label)
            if b.n > 1:
                ax.fill_between(xs, b.lo, b.hi, color=color, alpha=0.25, lw=0)
            drawn[f"{opt}/{v}"] = {
                "runs": [r.path for r in runs], "seeds": b.seeds, "x": "epoch" if per_epoch else "step",
                "steps": b.steps.tolist(), "mean": b.mean.tolist(), "lo": b.lo.tolist(),
                "hi": b.hi.tolist(), "truncated_to_common_steps": b.truncated,
            }  # fmt: skip
        ax.set_xlabel("epoch" if x == "epoch" else "step")
        ax.grid(alpha=0.3)
        if variants:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {PANEL_TITLES[opt]} runs given", ha="center", va="center",
                    transform=ax.transAxes, color="0.5")  # fmt: skip
    axes[0].set_ylabel("training loss")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"CreationDate": None} if out.suffix.lower() == ".pdf" else None
    fig.savefig(out, metadata=meta)
    plt.close(fig)
    other = sorted({o for (o, _) in groups} - set(OPTIMIZER_PANELS))
    return {"figure": str(out), "band": band, "smooth": k, "curves": drawn, "not_drawn": other}
