"""Seed-level and paired statistics (``dino_skipless/stats.py``) against scipy and by hand."""

import math

import numpy as np
import pytest
from scipy import stats as st

from dino_skipless.replication.seeds import compare_models, seed_rows
from dino_skipless.stats import (
    compare_seeds,
    mcnemar_exact,
    paired_diff_se,
    paired_hits,
    seed_summary,
    verdict,
)


def test_seed_summary_by_hand():
    s = seed_summary([62.0, 64.0, 66.0])
    assert s["mean"] == 64.0 and s["sd"] == pytest.approx(2.0)
    assert s["se"] == pytest.approx(2.0 / math.sqrt(3)) and s["n"] == 3
    one = seed_summary([5.0])
    assert one["sd"] is None and one["se"] is None  # one seed says nothing about seed noise


def test_compare_seeds_paired_matches_scipy_ttest_rel():
    a = {0: 66.6, 1: 65.9, 2: 66.4}
    b = {0: 68.3, 1: 62.8, 2: 69.4}
    t = compare_seeds(a, b)
    ref = st.ttest_rel([a[s] for s in (0, 1, 2)], [b[s] for s in (0, 1, 2)])
    assert t["test"] == "paired t over 3 seeds" and t["dof"] == 2
    assert t["t"] == pytest.approx(ref.statistic) and t["p"] == pytest.approx(ref.pvalue)
    assert t["diff"] == pytest.approx(np.mean([a[s] - b[s] for s in a]))


def test_compare_seeds_welch_when_seeds_differ_matches_scipy():
    a, b = [1.0, 2.0, 4.0, 3.5], {0: 0.5, 3: 1.0, 7: 0.0}
    t = compare_seeds(a, b)
    ref = st.ttest_ind(a, list(b.values()), equal_var=False)
    assert t["test"].startswith("Welch") and t["p"] == pytest.approx(ref.pvalue)
    assert t["t"] == pytest.approx(ref.statistic)
    # one seed on a side: no test, and the verdict says so instead of "shown"
    lone = compare_seeds([3.0], [1.0, 2.0])
    assert lone["se"] is None and verdict(lone["diff"], lone["se"]) == "untested (one seed)"


def test_compare_seeds_identical_differences():
    t = compare_seeds({0: 3.0, 1: 4.0}, {0: 1.0, 1: 2.0})
    assert t["se"] == 0 and t["p"] == 0.0 and verdict(t["diff"], t["se"], t["p"]) == "shown"


def test_verdict_rules():
    assert verdict(5.0, 1.0, 0.01) == "shown"
    assert verdict(-5.0, 1.0, 0.01) == "not shown"
    assert verdict(5.0, 1.0, 0.2) == "within noise"
    assert verdict(1.0, 1.0) == "within noise"  # below 2 s.e. without a p-value
    assert verdict(3.0, 1.0) == "shown"


def test_paired_hits_counts_and_mcnemar_by_hand():
    a = [1, 1, 1, 0, 1, 0, 1, 1]
    b = [1, 0, 0, 0, 1, 0, 1, 0]
    t = paired_hits(a, b)
    assert (t["only_a"], t["only_b"], t["n"]) == (3, 0, 8)
    assert t["diff"] == pytest.approx(100 * 3 / 8)
    # exact McNemar: 2 * P(Bin(3, 1/2) <= 0) = 0.25
    assert t["p_value"] == pytest.approx(0.25) == mcnemar_exact(3, 0)
    assert t["diff_se"] == pytest.approx(paired_diff_se(3, 0, 8))
    assert t["diff_se"] == pytest.approx(100 * math.sqrt(3 - 9 / 8) / 8)
    with pytest.raises(ValueError, match="equal-length"):
        paired_hits([1, 0], [1])


def test_seed_rows_separate_seed_noise_from_evaluation_noise():
    per_seed = {
        "skip_adamw": {
            s: {"value": v, "se": 1.0, "vs_floor": {"diff": g, "se": 0.5, "z": g / 0.5}}
            for s, (v, g) in enumerate([(60.0, 10.0), (62.0, 12.0), (64.0, 14.0)])
        },
        "skipless_adamw": {
            s: {"value": v, "se": 1.2, "vs_floor": {"diff": g, "se": 0.4, "z": g / 0.4}}
            for s, (v, g) in enumerate([(40.0, 1.0), (41.0, 2.0), (45.0, 0.0)])
        },
    }
    rows = seed_rows(per_seed)
    r = rows["skip_adamw"]
    assert r["value"]["mean"] == 62.0 and r["value"]["sd"] == pytest.approx(2.0)
    assert r["within_se"] == 1.0 and r["gain"]["mean"] == 12.0 and r["per_seed_z"] == [20, 24, 28]
    t = compare_models(per_seed, "skip_adamw", "skipless_adamw", "value")
    ref = st.ttest_rel([60, 62, 64], [40, 41, 45])
    assert t["p"] == pytest.approx(ref.pvalue) and t["verdict"] == "shown"
    g = compare_models(per_seed, "skip_adamw", "skipless_adamw", "gain")
    assert g["diff"] == pytest.approx(11.0)
    assert compare_models(per_seed, "skip_adamw", "nope") is None
