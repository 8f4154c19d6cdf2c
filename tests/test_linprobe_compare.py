"""Paired bootstrap of an mIoU difference, and the eval.compare CLI on two real probe runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_BACKBONE_ARGS

from eval import compare as lp_compare
from eval.linprobe import main as linprobe_main
from eval.metrics import bootstrap_miou, iou_from_counts, paired_bootstrap_miou


def _counts(rng, n=40, c=4, noise=0):
    tp = rng.integers(0, 50, (n, c))
    fp = rng.integers(0, 20 + noise, (n, c))
    fn = rng.integers(0, 20 + noise, (n, c))
    return np.stack([tp, fp, fn], -1)


def test_difference_by_hand():
    # 2 images, 2 classes, pooled. A: IoU 10/10 and 5/10 -> 75; B: 6/(6+2+2) and 5/10 -> 55
    a = np.array([[[6, 0, 0], [5, 5, 0]], [[4, 0, 0], [0, 0, 0]]])
    b = np.array([[[3, 2, 2], [5, 5, 0]], [[3, 0, 0], [0, 0, 0]]])
    r = paired_bootstrap_miou(a, b, n_boot=200)
    assert r["miou_a"] == pytest.approx(75.0)
    assert r["miou_b"] == pytest.approx(55.0)
    assert r["diff"] == pytest.approx(20.0)


def test_identical_runs_have_no_spread():
    a = _counts(np.random.default_rng(0))
    r = paired_bootstrap_miou(a, a.copy(), n_boot=500)
    assert r["diff"] == 0 and r["se"] == 0 and r["p"] == 1.0


def test_paired_se_matches_explicit_resampling_and_beats_unpaired():
    rng = np.random.default_rng(1)
    a = _counts(rng)
    b = a.copy()
    b[:, :, 0] = np.maximum(b[:, :, 0] - rng.integers(0, 4, b.shape[:2]), 0)  # B: a bit worse
    r = paired_bootstrap_miou(a, b, n_boot=4000, seed=3)
    # independent reference: explicit index resampling with its own random draws
    ref_rng = np.random.default_rng(123)
    diffs = []
    for _ in range(4000):
        idx = ref_rng.integers(0, len(a), len(a))
        ma = np.nanmean(iou_from_counts(a[idx].sum(0))) * 100
        mb = np.nanmean(iou_from_counts(b[idx].sum(0))) * 100
        diffs.append(ma - mb)
    assert r["se"] == pytest.approx(np.std(diffs, ddof=1), rel=0.1)
    assert r["diff"] > 0 and r["lo"] > 0 and r["p"] < 0.01
    unpaired = np.hypot(bootstrap_miou(a, 2000)["se"], bootstrap_miou(b, 2000)["se"])
    assert r["se"] < 0.5 * unpaired  # what pairing is for


def test_shape_mismatch_is_an_error():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="shape"):
        paired_bootstrap_miou(_counts(rng, n=5), _counts(rng, n=6))


def test_cli_on_two_real_probe_runs(tmp_path, capsys):
    args = ["--dataset", "synthetic", "--synthetic-n", "16", "--synthetic-size", "48"]
    args += ["--resolution", "48", *TINY_BACKBONE_ARGS]
    args += ["--mode", "both", "--epochs", "2", "--num-workers", "0", "--quiet"]
    linprobe_main([*args, "--random-init", "skipless_init", "--out", str(tmp_path / "a")])
    linprobe_main([*args, "--random-init", "skip", "--out", str(tmp_path / "b")])
    res_a = json.loads((tmp_path / "a" / "results.json").read_text())
    assert "per_image_counts" not in res_a and "per_image_counts" not in res_a["multiscale"]
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert lp_compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert "paired s.e." in capsys.readouterr().out
    r = json.loads(out.with_suffix(".json").read_text())
    res_b = json.loads((tmp_path / "b" / "results.json").read_text())
    # the counts saved for each run pool back to the mIoU its own results.json reports
    assert r["miou_a"] == pytest.approx(res_a["miou"]) and r["miou_b"] == pytest.approx(
        res_b["miou"]
    )
    m = lp_compare.compare_runs(tmp_path / "a", tmp_path / "b", "multiscale", n_boot=100)
    assert m["miou_a"] == pytest.approx(res_a["multiscale"]["miou"])

    # a different validation set is refused, and so is a folder without counts
    other = [a if a != "16" else "20" for a in args]
    linprobe_main([*other, "--random-init", "skip", "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="same validation images"):
        lp_compare.main([str(tmp_path / "a"), str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="per_image_counts.npz not found"):
        lp_compare.main([str(tmp_path / "a"), str(tmp_path)])


def test_reused_out_never_pairs_another_runs_counts(tmp_path):
    """Issue 18: a probe rerun into a folder holding an older run's per_image_counts.npz made
    eval.compare report different mIoUs for two identical probes."""
    args = ["--dataset", "synthetic", "--synthetic-n", "8", "--synthetic-size", "32"]
    args += ["--resolution", "32", *TINY_BACKBONE_ARGS]
    args += ["--epochs", "1", "--num-workers", "0", "--quiet", "--bootstrap", "20"]
    a, x = tmp_path / "a", tmp_path / "x"
    linprobe_main([*args, "--random-init", "skip", "--out", str(x)])  # an older, other run
    linprobe_main([*args, "--random-init", "skipless_init", "--out", str(a)])
    # the same probe as A into the reused folder, without counts this time
    linprobe_main([*args, "--random-init", "skipless_init", "--out", str(x), "--bootstrap", "0"])
    res_a, res_x = (json.loads((d / "results.json").read_text()) for d in (a, x))
    assert res_a["miou"] == res_x["miou"] and res_a["run_id"] != res_x["run_id"]
    assert not (x / "per_image_counts.npz").exists()  # the older run's counts are gone
    with pytest.raises(SystemExit, match="per_image_counts.npz not found"):
        lp_compare.main([str(a), str(x)])
    # counts from another run beside results.json (e.g. copied, or a crash between the writes)
    (x / "per_image_counts.npz").write_bytes((a / "per_image_counts.npz").read_bytes())
    with pytest.raises(SystemExit, match="different eval.linprobe runs"):
        lp_compare.main([str(a), str(x)])
    with np.load(a / "per_image_counts.npz") as z:
        assert str(z["run_id"]) == res_a["run_id"]
