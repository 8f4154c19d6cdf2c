"""Statistics shared by the evaluation stages, the trainer's k-NN monitor and the replications.

Two kinds of uncertainty, kept apart on purpose:

* **evaluation noise** of one trained model: tests that pair evaluation images (exact McNemar
  for per-image hits, ``paired_diff_se``). They answer "does this run beat its own init?".
* **training-seed noise**: how much a second seed of the same recipe would differ. Claims that
  compare *variants* rest on it: ``seed_summary`` (mean, s.d., s.e. over seeds) and
  ``compare_seeds`` (a t-test across seeds: paired by seed when both sides ran the same seeds,
  whose data order and crops are then identical, else Welch's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _st

# |difference| below this many standard errors is reported as "within noise" everywhere.
NOISE_SE = 2.0


# ----------------------------------------------------------------- paired evaluation images


def paired_diff_se(only_a: int, only_b: int, n: int) -> float:
    """Standard error (percent points) of the difference of two paired accuracies over ``n``
    items, from the discordant counts: sqrt((b + c) - (b - c)^2 / n) / n."""
    if n <= 0:
        return float("nan")
    b, c = int(only_a), int(only_b)
    return 100.0 * max(b + c - (b - c) ** 2 / n, 0.0) ** 0.5 / n


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` vs ``c`` discordant pairs.

    Under the null both kinds of discordant pair are equally likely, so ``min(b, c)`` is
    Binomial(b + c, 1/2); the p-value doubles its lower tail (capped at 1). Exact rather than
    chi-squared because a CorLoc difference often rests on a few dozen discordant images.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # log-space so that thousands of images do not overflow the binomial coefficients
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def paired_hits(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """A vs B scored on the same items (per-item hits): accuracies in percent, their
    difference, its paired s.e., z and the exact McNemar p-value."""
    ca, cb = np.asarray(a, bool), np.asarray(b, bool)
    if ca.shape != cb.shape or ca.ndim != 1 or not len(ca):
        raise ValueError(
            f"paired_hits needs two equal-length 1-D hit lists, got {ca.shape}, {cb.shape}"
        )
    only_a, only_b = int((ca & ~cb).sum()), int((~ca & cb).sum())
    diff = 100.0 * float(ca.mean() - cb.mean())
    se = paired_diff_se(only_a, only_b, len(ca))
    return {
        "top1_a": 100.0 * float(ca.mean()),
        "top1_b": 100.0 * float(cb.mean()),
        "diff": diff,
        "diff_se": se,
        "z": diff / se if se > 0 else None,
        "only_a": only_a,
        "only_b": only_b,
        "p_value": mcnemar_exact(only_a, only_b),
        "n": len(ca),
    }


# ----------------------------------------------------------------------------- training seeds


def seed_summary(values: Sequence[float]) -> dict:
    """Mean, between-seed s.d. (ddof 1) and s.e. of the mean over training seeds.

    With one seed the s.d. and s.e. are ``None``: nothing is known about seed noise."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    if not len(v):
        raise ValueError("seed_summary of no values")
    sd = float(v.std(ddof=1)) if len(v) > 1 else None
    return {
        "mean": float(v.mean()),
        "sd": sd,
        "se": sd / math.sqrt(len(v)) if sd is not None else None,
        "n": int(len(v)),
        "values": v.tolist(),
    }


def compare_seeds(
    a: dict[int, float] | Sequence[float], b: dict[int, float] | Sequence[float]
) -> dict:
    """Is A's mean over training seeds above B's? A t-test across seeds.

    ``a`` and ``b`` map seed -> value (or are plain lists, then unpaired). When both ran the
    same >= 2 seeds the test is paired by seed (each seed fixes the data order and the crops,
    so the pairs share that noise): t = mean(d) / (sd(d)/sqrt(n)), n - 1 degrees of freedom.
    Otherwise Welch's t-test (unequal variances). Returns the difference of means, its s.e.,
    t, the two-sided p, the degrees of freedom, the test's name and the seed count."""
    paired = isinstance(a, dict) and isinstance(b, dict)
    if paired:
        common = sorted(set(a) & set(b))
        paired = len(common) >= 2 and len(common) == len(a) == len(b)
    if paired:
        d = np.asarray([a[s] - b[s] for s in common], dtype=np.float64)
        n = len(d)
        se = float(d.std(ddof=1) / math.sqrt(n))
        diff = float(d.mean())
        dof = n - 1
        test = f"paired t over {n} seeds"
    else:
        va = np.asarray(list(a.values()) if isinstance(a, dict) else a, dtype=np.float64)
        vb = np.asarray(list(b.values()) if isinstance(b, dict) else b, dtype=np.float64)
        diff = float(va.mean() - vb.mean())
        if len(va) < 2 or len(vb) < 2:
            return {"diff": diff, "se": None, "t": None, "p": None, "dof": None,
                    "test": f"none ({len(va)} and {len(vb)} seeds)", "n": [len(va), len(vb)]}  # fmt: skip
        qa, qb = va.var(ddof=1) / len(va), vb.var(ddof=1) / len(vb)
        se = float(math.sqrt(qa + qb))
        # Welch-Satterthwaite degrees of freedom
        dof = (qa + qb) ** 2 / (qa**2 / (len(va) - 1) + qb**2 / (len(vb) - 1)) if se > 0 else 1
        test = f"Welch t ({len(va)} vs {len(vb)} seeds)"
        n = [len(va), len(vb)]
    if se > 0:
        t = diff / se
        p = float(2 * _st.t.sf(abs(t), dof))
    else:  # identical differences in every seed
        t, p = (math.inf if diff else 0.0), (0.0 if diff else 1.0)
    return {"diff": diff, "se": se, "t": t, "p": p, "dof": float(dof), "test": test, "n": n}


def verdict(diff: float, se: float | None, p: float | None = None, alpha: float = 0.05) -> str:
    """``shown`` / ``not shown`` / ``within noise`` for the claim "difference > 0".

    With a p-value (a test across seeds), within noise means p >= ``alpha``; otherwise a
    difference within ``NOISE_SE`` standard errors. ``None`` s.e.: the sign alone can be
    reported, never "shown" (one seed says nothing about seed noise)."""
    if se is None:
        return "untested (one seed)"
    if p is not None:
        if p >= alpha:
            return "within noise"
    elif abs(diff) < NOISE_SE * se:
        return "within noise"
    return "shown" if diff > 0 else "not shown"
