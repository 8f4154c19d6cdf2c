"""Supervised ceiling: the DINO budget, learning a trivially learnable label, the export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from PIL import Image

from dino_skipless.dino import AugConfig, MultiCropAugmentation
from dino_skipless.dino.augment_device import JITTER
from dino_skipless.dino.config import build_config
from dino_skipless.models import load_backbone
from dino_skipless.supervised import (
    _ClsViews,
    _collate,
    _collate_decoded,
    _DecodedViews,
    _device_views,
    _SeededViews,
    _SegViews,
    main,
    train_supervised,
)

TINY = {
    **TINY_MODEL,
    "model.variant": "skip",
    "data.batch_size_per_gpu": 8,
    "data.num_workers": 0,
    "optim.epochs": 6,
    "optim.warmup_epochs": 1,
    "optim.lr": 0.05,  # x 8/256: 1.6e-3
    "run.progress": False,
}


pytestmark = pytest.mark.usefixtures("one_thread")

STD = torch.tensor(AugConfig().std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def dark_light(tmp_path_factory):
    """Two classes that survive every augmentation: dark vs light images (20 each)."""
    root = tmp_path_factory.mktemp("dl")
    rng = np.random.default_rng(0)
    for i in range(40):
        c = i % 2
        d = root / ("dark", "light")[c]
        d.mkdir(exist_ok=True)
        base = (30, 225)[c] + rng.integers(-25, 25, (40, 40, 3))
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    return root


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_cls_matches_the_dino_budget_and_learns_an_easy_label(tmp_path, dark_light, augment_on):
    # solarisation would swap dark and light, i.e. destroy this toy label
    over = {"data.path": str(dark_light), "run.out": str(tmp_path), "aug.solarize_p_global2": 0,
            "data.augment_on": augment_on}  # fmt: skip
    r = train_supervised("cls", build_config(None, {**TINY, **over}))
    # the DINO run of this config: epochs x floor(40 / 8) iterations
    assert r.steps == 6 * (40 // 8) == len(r.losses)
    assert r.train_accuracy > 0.9  # dark vs light survives jitter, grayscale and blur
    assert np.mean(r.losses[-5:]) < 0.5 * np.mean(r.losses[:5])
    model, spec = load_backbone(tmp_path)
    assert spec.variant == "skip" and spec.depth == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == "cls" and summary["steps"] == r.steps


def test_seg_trains_on_synthetic_voc_masks_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPLESS_CACHE", str(tmp_path / "cache"))
    over = [f"{k}={v}" for k, v in TINY.items()] + ["data.synthetic_n=16", "optim.epochs=1"]
    assert main(["--task", "seg", "--out", str(tmp_path / "s"), "--seg-n", "12",
                 "--seg-size", "40", *over]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    # the labelled set (9 trainaug scenes) is cycled to the DINO epoch of 16 images
    assert summary["steps"] == 16 // 8 and summary["num_classes"] == 21
    assert summary["n_labelled"] == 9
    assert 0 <= summary["train_accuracy_last_epoch"] <= 1
    load_backbone(tmp_path / "s")


def test_seg_views_keep_image_and_mask_aligned():
    cfg = build_config(None, {**TINY, "aug.jitter_p": 0.0, "aug.grayscale_p": 0.0,
                              "aug.blur_p_global1": 0.0, "aug.blur_p_global2": 0.0,
                              "aug.solarize_p_global2": 0.0})  # fmt: skip
    # left half class 1 (white), right half class 2 (black): after any crop and flip, white
    # pixels of the view must carry label 1 and black ones label 2
    img = np.zeros((40, 40, 3), np.uint8)
    img[:, :20] = 255
    mask = np.full((40, 40), 2, np.uint8)
    mask[:, :20] = 1
    torch.manual_seed(0)
    for _ in range(5):
        x, y = _SegViews(cfg)(Image.fromarray(img), mask)
        grey = x.mean(1)  # (2, H, W), normalised
        assert set(torch.unique(y).tolist()) <= {1, 2}
        bright = grey > 0.5
        dark = grey < -0.5
        assert (y[bright] == 1).float().mean() > 0.97 and (y[dark] == 2).float().mean() > 0.97


def _smooth(w: int, h: int, seed: int) -> Image.Image:
    """Photo-like (bicubic-upsampled noise), so resampling differences stay small."""
    small = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def _scene(w: int, h: int, seed: int) -> tuple[Image.Image, np.ndarray]:
    """An image and an asymmetric 4-class mask (quadrants of unequal size, an ignore band):
    a wrong box or a missed flip changes it."""
    mask = np.ones((h, w), np.uint8)
    mask[: h // 3] = 2
    mask[:, : w // 4] += 2
    mask[h // 2 : h // 2 + 2] = 255
    return _smooth(w, h, seed), mask


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_device_views_are_the_cpu_paths_views(task):
    """data.augment_on=device: the same parameters as the CPU path for each (seed, epoch,
    index), so the same labels and masks exactly (nearest crops of the same boxes and flips)
    and the same pixels up to the device ops' documented rounding (mean |diff| <= 4/255 per
    view, 1/255 unjittered, as tests/test_dino_augment_device.py); another seed is far off."""
    cfg = build_config(None, {**TINY, "aug.global_size": 32})
    sizes = [(48, 40), (40, 56), (64, 48), (44, 44)]
    base = [
        (_scene(w, h, i) if task == "seg" else (_smooth(w, h, i), i % 3))
        for i, (w, h) in enumerate(sizes)
    ]
    views = _ClsViews(MultiCropAugmentation(cfg.aug)) if task == "cls" else _SegViews(cfg)

    def device_batch(seed: int):
        dec = _DecodedViews(base, cfg, seed, task)
        dec.epoch = 2
        items = [dec[i] for i in range(len(base))]
        x, y = _device_views(_collate_decoded(items), dec.aug, "cpu")
        return x, y, torch.stack([it[1][:2, JITTER] for it in items]).flatten()

    cpu = _SeededViews(base, views, seed=5)
    cpu.epoch = 2
    x_cpu, y_cpu = _collate([cpu[i] for i in range(len(base))])
    x_dev, y_dev, jittered = device_batch(5)
    assert x_dev.shape == x_cpu.shape == (8, 3, 32, 32)
    torch.testing.assert_close(y_dev, y_cpu, rtol=0, atol=0)
    diff = ((x_dev - x_cpu) * STD).abs().mean((1, 2, 3)) * 255
    bound = torch.where(jittered > 0.5, 4.0, 1.0)
    assert (diff <= bound).all(), (diff, bound)
    x_other, y_other, _ = device_batch(6)
    assert ((x_other - x_cpu) * STD).abs().mean() * 255 > 10
    if task == "seg":
        assert set(torch.unique(y_dev).tolist()) <= {1, 2, 3, 4, 255}
        assert not torch.equal(y_other, y_cpu)
