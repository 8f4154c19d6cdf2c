"""DINO's schedules and gradient surgery against the official formulas / loops."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from dino_skipless.dino.schedules import (
    apply_schedules_,
    build_schedules,
    cancel_gradients_last_layer,
    clip_gradients,
    cosine_scheduler,
    scaled_lr,
)


def test_cosine_scheduler_matches_formula():
    base, final, epochs, nit, wu, start = 2.0, 0.1, 7, 5, 2, 0.3
    s = cosine_scheduler(base, final, epochs, nit, warmup_epochs=wu, start_warmup_value=start)
    assert len(s) == epochs * nit
    w = wu * nit
    n = epochs * nit - w
    assert s[0] == pytest.approx(start)
    assert s[w - 1] == pytest.approx(base)  # linspace includes its end point
    assert s[w // 2] == pytest.approx(start + (base - start) * (w // 2) / (w - 1))
    assert s[w] == pytest.approx(base)  # cosine starts at base
    i = n // 2
    assert s[w + i] == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)))
    assert s[-1] == pytest.approx(
        final + 0.5 * (base - final) * (1 + math.cos(math.pi * (n - 1) / n))
    )
    assert len(cosine_scheduler(1.0, 0.0, 3, 4)) == 12
    assert cosine_scheduler(1.0, 0.0, 3, 4)[0] == 1.0


def test_cosine_scheduler_rejects_warmup_longer_than_run():
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1.0, 0.0, 2, 3, warmup_epochs=3)


def test_build_schedules_reproduces_dino_vit_s_defaults():
    nit, epochs = 4, 300
    s = build_schedules(
        lr=0.0005,
        min_lr=1e-6,
        warmup_epochs=10,
        weight_decay=0.04,
        weight_decay_end=0.4,
        momentum_teacher=0.996,
        epochs=epochs,
        niter_per_ep=nit,
        total_batch=1024,
    )
    assert scaled_lr(0.0005, 1024) == pytest.approx(0.002)
    assert len(s) == len(s.wd) == len(s.momentum) == epochs * nit
    assert s.lr[0] == 0.0
    assert s.lr[10 * nit - 1] == pytest.approx(0.002) and s.lr[10 * nit] == pytest.approx(0.002)
    n = (epochs - 10) * nit
    assert s.lr[-1] == pytest.approx(
        1e-6 + 0.5 * (0.002 - 1e-6) * (1 + math.cos(math.pi * (n - 1) / n))
    )
    assert s.wd[0] == pytest.approx(0.04) and s.wd[-1] == pytest.approx(0.4, abs=1e-5)
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] == pytest.approx(1.0, abs=1e-6)
    assert np.all(np.diff(s.wd) >= 0) and np.all(np.diff(s.momentum) >= 0)
    at = s.at(10 * nit)
    assert at == {
        "lr": pytest.approx(0.002),
        "wd": float(s.wd[40]),
        "momentum": float(s.momentum[40]),
    }
    with pytest.raises(IndexError):
        s.at(epochs * nit)


def test_apply_schedules_sets_all_lrs_and_only_first_group_wd():
    a, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}])
    apply_schedules_(opt, 0.123, 0.05)
    assert [g["lr"] for g in opt.param_groups] == [0.123, 0.123]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def official_clip(model, clip):  # facebookresearch/dino utils.clip_gradients
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def test_clip_gradients_is_bit_identical_to_official_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.LayerNorm(20), nn.Linear(20, 5), nn.Linear(5, 5))
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn_like(p) * (0.05 if i % 2 else 5.0)  # some above, some below 3.0
    model[3].weight.grad = None
    ref = copy.deepcopy(model)
    for a, b in zip(model.parameters(), ref.parameters()):
        b.grad = None if a.grad is None else a.grad.clone()
    norms = clip_gradients(model, 3.0)
    ref_norms = official_clip(ref, 3.0)
    assert norms.tolist() == ref_norms
    assert any(n > 3.0 for n in ref_norms) and any(n < 3.0 for n in ref_norms)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
            assert a.grad.norm().item() <= 3.0 + 1e-5


def test_cancel_gradients_last_layer():
    model = nn.ModuleDict({"mlp": nn.Linear(3, 3), "last_layer": nn.Linear(3, 2)})
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cancel_gradients_last_layer(1, model, freeze_last_layer=1)  # epoch 1: no longer frozen
    assert all(p.grad is not None for p in model.parameters())
    cancel_gradients_last_layer(0, model, freeze_last_layer=1)
    assert model["last_layer"].weight.grad is None and model["last_layer"].bias.grad is None
    assert model["mlp"].weight.grad is not None
