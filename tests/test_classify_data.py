"""The supervised data layer: timm's Mixup / CutMix / label smoothing, seeding, RandAugment's
posterize under current Pillow, top-k counts, val shards."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from dino_skipless.classifier.config import build_config
from dino_skipless.classifier.data import (
    ShardSampler,
    build_criterion,
    build_mixup,
    mix,
    split_roots,
    train_transform,
)
from dino_skipless.classifier.evaluate import topk_correct
from dino_skipless.data import DatasetError
from dino_skipless.dino.sampling import SeededTransform, sample_seeds, seeded_rngs
from dino_skipless.fileio import write_yaml

PAPER = build_config(None, {})  # the recipe's defaults


def test_mixup_cutmix_and_label_smoothing_come_from_timm():
    m = build_mixup(PAPER, 1000)
    assert type(m) is Mixup  # timm's own class, not a copy
    assert (m.mixup_alpha, m.cutmix_alpha, m.cutmix_minmax) == (0.8, 1.0, None)
    assert (m.mix_prob, m.switch_prob, m.mode, m.label_smoothing) == (1.0, 0.5, "batch", 0.1)
    assert m.num_classes == 1000 and m.correct_lam
    assert type(build_criterion(PAPER)) is SoftTargetCrossEntropy  # smoothing is in the targets
    off = build_config(None, {"mixup.mixup_alpha": 0, "mixup.cutmix_alpha": 0})
    assert build_mixup(off, 10) is None
    ls = build_criterion(off)  # main.py: label smoothing CE when Mixup is off
    assert type(ls) is LabelSmoothingCrossEntropy and ls.smoothing == 0.1


def test_mixup_targets_are_the_smoothed_labels_mixed_by_the_image_weight():
    """Mixup only (alpha 0.8, prob 1): x' = lam x + (1 - lam) x.flip(0); the target is the same
    mix of the smoothed one-hots: on = 1 - 0.1 + 0.1 / C, off = 0.1 / C (timm's formula, by hand)."""
    cfg = build_config(None, {"mixup.cutmix_alpha": 0})
    c = 5
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 3, 1, 4])
    xm, t = mix(build_mixup(cfg, c), x.clone(), y, (0, 7, 0, 0))
    lam = ((xm - x.flip(0)) / (x - x.flip(0)))[0, 0, 0, 0].item()
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    assert 0 < lam < 1
    smooth = torch.full((4, c), 0.1 / c)
    smooth[torch.arange(4), y] = 1 - 0.1 + 0.1 / c
    torch.testing.assert_close(t, lam * smooth + (1 - lam) * smooth.flip(0))
    assert torch.allclose(t.sum(1), torch.ones(4))


def test_cutmix_pastes_a_box_and_weights_the_targets_by_its_area():
    cfg = build_config(None, {"mixup.mixup_alpha": 0})
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    for step in range(20):  # the first draw whose box is neither empty nor the whole image
        xm, t = mix(build_mixup(cfg, 2), x.clone(), y, (1, step, 0, 0))
        pasted = (xm[0] != x[0]).any(0)  # the pixels taken from image 1 (= x.flip(0)[0])
        if 0 < pasted.sum() < 256:
            break
    assert torch.equal(xm[0][:, pasted], x[1][:, pasted]) and 0 < pasted.sum() < 256
    lam = 1 - pasted.float().mean().item()  # correct_lam: the box's true area
    on, off = 1 - 0.1 + 0.05, 0.05
    assert t[0].tolist() == pytest.approx([lam * on + (1 - lam) * off, lam * off + (1 - lam) * on])


def test_mix_is_a_function_of_its_key_and_leaves_the_global_rngs_alone():
    m = build_mixup(PAPER, 3)
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    a = mix(m, x.clone(), y, (0, 1, 0, 0))
    b = mix(m, x.clone(), y, (0, 1, 0, 0))
    c = mix(m, x.clone(), y, (0, 2, 0, 0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert np.array_equal(np.random.get_state()[1], before)


def test_seeded_transform_draws_from_seed_epoch_index_only():
    def draw(img, label):
        return (torch.rand(1).item(), random.random(), float(np.random.rand()), label)

    ds = SeededTransform([(None, 7)] * 3, draw, seed=4)
    torch.manual_seed(0)
    a = ds[(2, 1)]
    torch.manual_seed(1)  # the caller's RNG state does not matter ...
    assert ds[(2, 1)] == a and a[3] == 7
    assert ds[(2, 0)] != a and ds[(3, 1)] != a
    t_seed, p_seed = sample_seeds(4, 2, 1)  # ... torch and python see sample_seeds' seeds
    assert a[0] == torch.rand(1, generator=torch.Generator().manual_seed(t_seed)).item()
    assert a[1] == random.Random(p_seed).random()
    n_seed = np.random.SeedSequence([4, 2, 1]).generate_state(3)[2]  # numpy the next word
    assert a[2] == np.random.RandomState(n_seed).rand()
    torch.manual_seed(9)
    before = torch.rand(1)
    torch.manual_seed(9)
    with seeded_rngs(1, 2, 3):
        torch.rand(5)
    assert torch.equal(torch.rand(1), before)  # ... and get their own state back


def test_posterize_at_full_magnitude_is_black_not_a_crash():
    """RandAugment 'inc1' at magnitude 10 keeps 0 bits; recent Pillow (13.0 here) raises ValueError on
    that (it stopped a CPU run after ~500 images), the recipe's Pillow returned black."""
    ra = next(t for t in train_transform(PAPER).transforms if isinstance(t, RandAugment))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # bits kept: 4 - 4 = 0
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    out = np.asarray(op(img))
    assert out.shape == (8, 8, 3) and out.max() == 0
    op.magnitude = 5  # 4 - int(5 / 10 * 4) = 2 bits: 200 = 0b11001000 -> 0b11000000
    assert np.asarray(op(img)).max() == 192


def test_topk_correct_by_hand():
    logits = torch.tensor(
        [[0.1, 0.5, 0.2, 0.0], [0.9, 0.1, 0.3, 0.2], [0.0, 0.1, 0.2, 0.3], [0.3, 0.2, 0.1, 0.0]]
    )
    y = torch.tensor([1, 2, 0, 3])
    # ranks of the target: 1st, 2nd, 4th, 4th
    assert topk_correct(logits, y, (1, 2, 3, 5)) == [1, 2, 2, 4]


def test_val_shards_score_every_image_once():
    shards = [list(ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert shards[0] == [0, 3, 6, 9] and len(ShardSampler(10, 3, 2)) == 3


def test_a_run_config_records_the_data_path_portably_and_reads_it_back(tmp_path, monkeypatch):
    """config.yaml names the cached dataset through $SKIPLESS_CACHE, and that config's path
    resolves to the same folder again (and says where it looked when the variable is unset)."""
    cache = tmp_path / "cache"
    root = cache / "synthetic" / "photos"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
    monkeypatch.setenv("SKIPLESS_CACHE", str(cache))
    cfg = build_config(overrides={"data.path": str(root)})
    write_yaml(tmp_path / "config.yaml", cfg.to_dict())
    text = (tmp_path / "config.yaml").read_text()
    assert "path: $SKIPLESS_CACHE/synthetic/photos\n" in text and str(tmp_path) not in text
    again = build_config(tmp_path / "config.yaml")
    train, val, _ = split_roots(again)
    assert (train, val) == (root / "train", root / "val")
    monkeypatch.delenv("SKIPLESS_CACHE")
    with pytest.raises(DatasetError, match=r"\$SKIPLESS_CACHE/synthetic/photos: not a directory"):
        split_roots(again)
