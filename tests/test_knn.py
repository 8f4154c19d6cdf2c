import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BACKBONE_ARGS

from eval.knn import main
from eval.knn_lib import (
    PixelBaseline,
    knn_scores,
    knn_vote,
    paired_knn,
    search_torch,
    split_indices,
    top1_se,
    topk_accuracy,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_knn(train, train_y, test, k, t, c):
    """Reference: full sort per test row, votes exp(sim / T) per neighbour's class."""
    out = np.zeros((len(test), c))
    for i, q in enumerate(test):
        sims = train @ q
        nn = np.argsort(-sims, kind="stable")[:k]
        for j in nn:
            out[i, train_y[j]] += np.exp(sims[j] / t)
    return out


def test_vote_hand_computed():
    sims = torch.tensor([[0.7, 0.14, 0.07]])
    labels = torch.tensor([[2, 0, 2]])
    s = knn_vote(sims, labels, 3, 0.07)
    want = [np.exp(2.0), 0.0, np.exp(10.0) + np.exp(1.0)]
    np.testing.assert_allclose(s[0].numpy(), want, rtol=1e-6)


def test_knn_matches_numpy_reference():
    g = torch.Generator().manual_seed(0)
    c, k = 5, 7
    train = F.normalize(torch.randn(60, 16, generator=g, dtype=torch.float64), dim=1)
    test = F.normalize(torch.randn(13, 16, generator=g, dtype=torch.float64), dim=1)
    train_y = torch.randint(0, c, (60,), generator=g)
    got = knn_scores(train, train_y, test, k, 0.07, c, backend="torch", chunk=4)
    ref = numpy_knn(train.numpy(), train_y.numpy(), test.numpy(), k, 0.07, c)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9)
    # k larger than the training set: every training image votes
    sims, idx = search_torch(train[:3], test, k=10)
    assert idx.shape == (13, 3)


def test_topk_accuracy_hand_case():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.1, 0.2]])
    labels = torch.tensor([1, 2, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2))
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top2"] == pytest.approx(200 / 3)


def test_split_is_deterministic_disjoint_and_covers_classes():
    targets = [0] * 5 + [1] * 10 + [2] * 2
    tr, va = split_indices(targets, 0.2, seed=0)
    assert (tr, va) == split_indices(targets, 0.2, seed=0)
    assert sorted(tr + va) == list(range(len(targets))) and not set(tr) & set(va)
    assert {targets[i] for i in va} == {0, 1, 2} and {targets[i] for i in tr} == {0, 1, 2}
    assert len(va) == 1 + 2 + 1


def test_cli_synthetic_imagefolder(tmp_path):
    out = tmp_path / "knn"
    argv = [
        "--dataset", "synthetic", "--root", str(tmp_path / "syn"), "--synthetic-n", "30",
        "--synthetic-size", "32", "--random-init", "skip", *TINY_BACKBONE_ARGS,
        "--resize", "32", "--crop", "32", "--num-workers", "0",
        "--k", "5", "20", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["k"] == 5 and set(res["per_k"]) == {"5", "20"}
    assert res["n_train"] + res["n_val"] == 30 and res["num_classes"] == 6
    assert 0 <= res["top1"] <= res["top5"] <= 100
    # per-image hits of the reported k, and a digest of the validation labels for pairing
    assert len(res["val_correct"]) == res["n_val"]
    assert 100 * np.mean(res["val_correct"]) == pytest.approx(res["top1"])
    assert res["top1_se"] == pytest.approx(top1_se(res["top1"], res["n_val"]))


def test_top1_se_is_binomial():
    assert top1_se(50.0, 400) == pytest.approx(100 * math.sqrt(0.25 / 400))
    assert top1_se(0.0, 10) == 0.0


def test_pixel_baseline_is_area_downsampling():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    got = PixelBaseline(2)(x)
    want = x.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5)).flatten(1)
    torch.testing.assert_close(got, want)
    assert got.shape == (2, 12)


def test_paired_knn_hand_counts():
    # 10 images: A right on 0-6, B right on 0-3 and 7: A-only {4, 5, 6}, B-only {7}
    a = {"val_correct": [1] * 7 + [0] * 3, "val_digest": "x"}
    b = {"val_correct": [1] * 4 + [0] * 3 + [1] + [0] * 2, "val_digest": "x"}
    r = paired_knn(a, b)
    assert (r["only_a"], r["only_b"], r["n"]) == (3, 1, 10)
    assert r["diff"] == pytest.approx(20.0)
    # s.e. of a paired difference of proportions: sqrt((b + c) - (b - c)^2 / n) / n
    assert r["diff_se"] == pytest.approx(100 * math.sqrt(4 - 4 / 10) / 10)
    assert r["p_value"] == pytest.approx(2 * (1 + 4) / 16)  # exact McNemar, 3 vs 1
    with pytest.raises(ValueError, match="different validation images"):
        paired_knn(a, {**b, "val_digest": "y"})


def test_cli_pixels_and_a_paired_comparison(tmp_path):
    common = [
        "--dataset", "synthetic", "--root", str(tmp_path / "syn"), "--synthetic-n", "30",
        "--synthetic-size", "32", "--resize", "32", "--crop", "32", "--num-workers", "0",
        "--quiet", "--synthetic-seed", "3",
    ]  # fmt: skip
    assert main([*common, "--pixels", "8", "--out", str(tmp_path / "px")]) == 0
    px = json.loads((tmp_path / "px" / "results.json").read_text())
    assert px["checkpoint"] == {"pixels": 8} and px["label"] == "pixels-8"
    assert main([*common, "--random-init", "skip", *TINY_BACKBONE_ARGS,
                 "--out", str(tmp_path / "rnd")]) == 0  # fmt: skip
    rnd = json.loads((tmp_path / "rnd" / "results.json").read_text())
    r = paired_knn(px, rnd)
    assert r["diff"] == pytest.approx(px["top1"] - rnd["top1"]) and r["n"] == px["n_val"]


def test_k_above_the_training_set_is_recorded_as_used(tmp_path, capsys):
    """Issue 33, point 13: k = 50 on 24 training images silently votes with all 24; the run
    now says so and records the k it used."""
    out = tmp_path / "px"
    argv = [
        "--dataset", "synthetic", "--root", str(tmp_path / "syn"), "--synthetic-n", "30",
        "--synthetic-size", "32", "--resize", "32", "--crop", "32", "--num-workers", "0",
        "--quiet", "--pixels", "4", "--k", "50", "24", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_train"] == 24 and res["k"] == 50 and res["k_used"] == 24
    assert res["k_used_per_k"] == {"50": 24, "24": 24}
    assert res["per_k"]["50"] == res["per_k"]["24"]  # the same vote
    assert "k=50 is more than the 24 training images" in capsys.readouterr().err
    assert "50 (all 24 train images)" in (out / "results.md").read_text()
