"""Regression test of learning itself: a short DINO run must beat its own random init on k-NN.

Every other trainer test checks a formula or a state; this one checks that training *teaches*:
a few hundred DINO steps of a small residual ViT on the synthetic class folders (kind = surface
pattern; colour, silhouette, size and position are nuisances) must give teacher features whose
20-NN top-1 on held-out folders (another seed) beats the same architecture at random init by a
margin and a paired test that a broken trainer cannot pass: a teacher that never updates, a
loss without centring (collapse) or a student without gradient all leave the exported teacher
at (or below) its random init. ``scripts/learning_check.py`` runs those broken trainers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from dino_skipless.dino.config import build_config
from dino_skipless.dino.trainer import train
from eval.knn import main as knn_main
from eval.knn import paired_knn

# The world and recipe of the check (shared with scripts/learning_check.py).
LEARNING_RECIPE = {
    "model.arch": "vit_mini",
    "model.variant": "skip",
    "model.depth": 4,
    "model.patch_size": 8,
    "aug.global_size": 32,
    "aug.local_size": 16,
    "aug.n_local": 4,
    "dino.out_dim": 1024,
    "dino.head_hidden_dim": 512,
    "dino.head_bottleneck_dim": 128,
    "dino.momentum_teacher": 0.99,
    "dino.warmup_teacher_temp": 0.01,
    "dino.teacher_temp": 0.01,
    "dino.warmup_teacher_temp_epochs": 0,
    "optim.epochs": 10,
    "optim.warmup_epochs": 1,
    "optim.lr": 0.001,
    "optim.min_lr": 1e-5,
    "data.batch_size_per_gpu": 32,
    "data.num_workers": 0,
    "data.synthetic_n": 960,
    "data.synthetic_size": 48,
    "run.precision": "fp32",
    "run.saveckp_freq": 0,
    "run.keep_epochs": [],
    "run.progress": False,
    "run.tensorboard": False,
    "run.log_every": 10,
}
KNN_ARGS = ["--dataset", "synthetic", "--synthetic-n", "900", "--synthetic-size", "48",
            "--synthetic-seed", "1", "--resize", "32", "--crop", "32", "--num-workers", "0",
            "--quiet"]  # fmt: skip
MIN_GAIN = 8.0  # k-NN top-1 points over random init
MIN_Z = 3.0  # and at least 3 paired standard errors


def knn(out, src: list[str]) -> dict:
    assert knn_main([*KNN_ARGS, *src, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def learning_gain(tmp_path, **overrides) -> tuple[dict, dict]:
    """(trained-vs-random paired k-NN comparison, the run's summary)."""
    cfg = build_config(None, {**LEARNING_RECIPE, "run.out": str(tmp_path / "run"), **overrides})
    res = train(cfg)
    trained = knn(tmp_path / "knn_trained", ["--ckpt", str(tmp_path / "run")])
    rnd = knn(tmp_path / "knn_random", ["--random-init", "skip", "--arch", "vit_mini",
                                        "--depth", "4", "--patch-size", "8"])  # fmt: skip
    return paired_knn(trained, rnd), res.collapse


@pytest.mark.slow
def test_short_dino_run_beats_random_init_on_knn(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPLESS_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    r, collapse = learning_gain(tmp_path)
    print(json.dumps(r))
    assert not collapse["collapsed"], collapse
    assert r["diff"] >= MIN_GAIN, r
    assert r["diff"] / r["diff_se"] >= MIN_Z and r["p_value"] < 1e-3, r
    assert math.isfinite(r["top1_a"])
