"""Paired CorLoc comparison: exact McNemar p-values and the discordant-image counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_BACKBONE_ARGS
from scipy.stats import binomtest

from tokencut import compare as tc_compare
from tokencut import run as tc_run
from tokencut.corloc import mcnemar_exact


def test_mcnemar_exact_hand_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(4, 4) == 1.0
    # 0 vs 5: both one-sided tails are 1/32, two-sided 2/32
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    # 1 vs 4: P(X <= 1) = (1 + 5) / 32
    assert mcnemar_exact(1, 4) == pytest.approx(12 / 32)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


@pytest.mark.parametrize("b,c", [(180, 131), (68, 65), (3, 17), (0, 40), (1500, 1400), (2, 2)])
def test_mcnemar_exact_matches_scipy(b, c):
    ref = binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-9, abs=1e-300)


def _run(ious_by_layer: dict[int, list[float]], best: int) -> dict:
    n = len(next(iter(ious_by_layer.values())))
    per_image = [
        {
            "image": f"im{i}",
            "best_iou": ious_by_layer[best][i],
            "best_iou_per_layer": {str(li): v[i] for li, v in ious_by_layer.items()},
        }
        for i in range(n)
    ]
    per_layer = {
        str(li): 100 * float(np.mean(np.array(v) >= 0.5)) for li, v in ious_by_layer.items()
    }
    return {"layer": best, "best_layer": best, "per_layer": per_layer, "per_image": per_image}


def test_paired_counts_by_hand():
    # A hits images 0,1,2,3; B hits 2,3,4 -> only A: {0,1}, only B: {4}
    a = _run({0: [0.9, 0.6, 0.5, 0.7, 0.1, 0.0], 1: [0.0] * 6}, best=0)
    b = _run({0: [0.1, 0.2, 0.8, 0.5, 0.55, 0.3], 1: [0.9] * 6}, best=1)
    rep = tc_compare.compare(a, b, layer_b=0)
    h = rep["reported"]
    assert (h["layer_a"], h["layer_b"], h["n_images"]) == (0, 0, 6)
    assert (h["only_a"], h["only_b"]) == (2, 1)
    assert h["corloc_a"] == pytest.approx(400 / 6) and h["corloc_b"] == pytest.approx(300 / 6)
    assert h["p_value"] == pytest.approx(1.0)  # 1 vs 2 discordant: no evidence
    # default: each run's reported (best) block; block 1 of B hits everything
    rep = tc_compare.compare(a, b)
    assert (rep["reported"]["layer_b"], rep["reported"]["only_b"]) == (1, 2)
    assert [r["layer_a"] for r in rep["per_block"]] == [0, 1]
    assert rep["per_block"][1]["only_b"] == 6 and rep["per_block"][1]["p_value"] == pytest.approx(
        2 / 64
    )


def test_mismatched_images_and_trimmed_results_are_explained():
    a = _run({0: [0.9, 0.1]}, best=0)
    b = _run({0: [0.9, 0.1, 0.3]}, best=0)
    with pytest.raises(ValueError, match="same images"):
        tc_compare.compare(a, b)
    with pytest.raises(ValueError, match="per_image"):
        tc_compare.compare({"layer": 0, "per_image": []}, a)
    with pytest.raises(ValueError, match="block 3 was not evaluated"):
        tc_compare.compare(a, a, layer_a=3)


def test_cli_on_two_real_runs(tmp_path, capsys):
    syn = ["--dataset", "synthetic", "--synthetic-n", "8", "--synthetic-size", "48"]
    common = [*TINY_BACKBONE_ARGS, "--sweep-layers"]
    common += ["--num-workers", "0", "--quiet"]
    for name, seed in (("a", "0"), ("b", "1")):
        tc_run.main([*syn, "--random-init", "skipless_init", "--seed", seed, *common,
                     "--out", str(tmp_path / name)])  # fmt: skip
    capsys.readouterr()
    assert (
        tc_compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")])
        == 0
    )
    text = capsys.readouterr().out
    assert "McNemar p" in text and "(reported)" in text
    rep = json.loads((tmp_path / "cmp.json").read_text())
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    for r in rep["per_block"]:
        assert r["corloc_a"] == pytest.approx(ra["per_layer"][str(r["layer_a"])])
        assert r["corloc_b"] == pytest.approx(rb["per_layer"][str(r["layer_b"])])
    assert rep["reported"]["layer_a"] == ra["best_layer"]
