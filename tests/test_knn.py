import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.knn import knn_scores, knn_vote, main, search_torch, split_indices, topk_accuracy


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
        "--synthetic-size", "32", "--random-init", "skip", "--arch", "vit_mini", "--depth", "2",
        "--patch-size", "8", "--resize", "32", "--crop", "32", "--num-workers", "0",
        "--k", "5", "20", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["k"] == 5 and set(res["per_k"]) == {"5", "20"}
    assert res["n_train"] + res["n_val"] == 30 and res["num_classes"] == 6
    assert 0 <= res["top1"] <= res["top5"] <= 100
