"""Training seeds on a results page: summaries and the tests that compare variants.

``per_seed`` maps a model name (e.g. ``skip_adamw``) to ``{seed: row}``, where a row holds an
evaluation's ``value`` (top-1, mIoU, CorLoc), its within-run ``se`` (evaluation noise: binomial
or bootstrap over the evaluation images) and, where the run has one, ``vs_floor`` (the paired
test against the run's own initialisation: ``diff``, ``se``, ``z``, ``p``).

``seed_rows`` gives per model: the mean over seeds ± its s.e., the between-seed s.d. beside the
mean within-run s.e. (which of the two noises dominates), and the same for the gain over the own
init. ``compare_models`` tests "A > B" across seeds (``stats.compare_seeds``: paired by seed
when both ran the same seeds) on the final value and on the gain.
"""

from __future__ import annotations

import math

from ..stats import compare_seeds, seed_summary, verdict


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def seed_rows(per_seed: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per model: ``value`` and ``gain`` seed summaries, ``within_se`` (mean of the runs' own
    s.e.) and ``gain_within_se`` (mean paired s.e. of the gains), ``seeds``, ``per_seed_z``."""
    out = {}
    for name, rows in per_seed.items():
        seeds = sorted(rows)
        values = [rows[s]["value"] for s in seeds]
        row = {
            "seeds": seeds,
            "value": seed_summary(values),
            "within_se": _mean([rows[s].get("se") for s in seeds]),
        }
        gains = [rows[s]["vs_floor"] for s in seeds if rows[s].get("vs_floor")]
        if len(gains) == len(seeds):
            row["gain"] = seed_summary([g["diff"] for g in gains])
            row["gain_within_se"] = _mean([g.get("se") for g in gains])
            row["per_seed_z"] = [g.get("z") for g in gains]
        out[name] = row
    return out


def compare_models(
    per_seed: dict[str, dict[int, dict]], a: str, b: str, what: str = "value"
) -> dict | None:
    """ "``a`` > ``b``" across training seeds on the final ``value`` or the ``gain`` over each
    run's own init; None when either model is missing."""
    if a not in per_seed or b not in per_seed:
        return None

    def pick(rows: dict[int, dict]) -> dict[int, float]:
        if what == "gain":
            return {s: r["vs_floor"]["diff"] for s, r in rows.items() if r.get("vs_floor")}
        return {s: r["value"] for s, r in rows.items()}

    t = compare_seeds(pick(per_seed[a]), pick(per_seed[b]))
    return t | {"verdict": verdict(t["diff"], t["se"], t["p"]), "a": a, "b": b, "what": what}


def fmt_seed(summary: dict, digits: int = 2) -> str:
    """``62.16 ± 0.80 (s.d. 1.39, 3 seeds)``, or the single value with ``(1 seed)``."""
    if summary["se"] is None:
        return f"{summary['mean']:.{digits}f} (1 seed)"
    return (
        f"{summary['mean']:.{digits}f} ± {summary['se']:.{digits}f} "
        f"(s.d. {summary['sd']:.{digits}f}, {summary['n']} seeds)"
    )


def fmt_test(t: dict | None) -> str:
    """``+2.31 ± 0.80, paired t over 3 seeds, p = 0.10``."""
    if not t:
        return "–"
    if t["se"] is None:
        return f"{t['diff']:+.2f} ({t['test']})"
    return f"{t['diff']:+.2f} ± {t['se']:.2f}, {t['test']}, p = {t['p']:.2g}"
