"""Trainer with ``data.augment_on=device`` (CPU as the device): loss curve vs the CPU path,
exact resume."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_PRETRAIN, smooth_image, tiny_pretrain_config

from dino_skipless.dino.trainer import train
from dino_skipless.pretrain import main

TINY = {**TINY_PRETRAIN, "model.variant": "skip", "run.keep_epochs": []}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """16 smooth JPEGs of different sizes (the canvas padding is exercised)."""
    root = tmp_path_factory.mktemp("imgs") / "a"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        size = (40 + 4 * (i % 3), 36 + 6 * (i % 4))
        smooth_image(rng, size).save(root / f"{i:02d}.jpg", quality=95)
    return root.parent


def _cfg(out, data, **extra):
    return tiny_pretrain_config(out, data, TINY, **extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_dir):
    tmp = tmp_path_factory.mktemp("runs")
    cpu = train(_cfg(tmp / "cpu", image_dir))
    device = train(_cfg(tmp / "device", image_dir, **{"data.augment_on": "device"}))
    other_seed = train(_cfg(tmp / "seed1", image_dir, **{"run.seed": 1}))
    return tmp, cpu, device, other_seed


def test_device_path_follows_the_cpu_loss_curve(runs):
    """Same parameters, crops within ~1/255: the 8-step loss curves agree far closer than the
    run-to-run noise of another seed (which changes init, order and crops)."""
    _, cpu, device, other = runs
    assert len(cpu.losses) == len(device.losses) == 8
    gap = np.abs(np.subtract(cpu.losses, device.losses)).max()
    noise = np.abs(np.subtract(cpu.losses, other.losses)).max()
    print(f"max |cpu - device| {gap:.2e}, max |seed0 - seed1| {noise:.2e}")
    assert gap < 0.2 * noise, (gap, noise)
    assert np.all(np.isfinite(device.losses))


def test_device_path_resumes_exactly(tmp_path, image_dir, runs):
    _, _, device, _ = runs
    out = tmp_path / "resumed"
    extra = {"data.augment_on": "device", "run.max_steps": 3, "run.ckpt_every_steps": 3}
    first = train(_cfg(out, image_dir, **extra))
    assert first.stopped_early and first.step == 3
    second = main(["--out", str(out), "--resume"])
    assert first.losses + second.losses == device.losses  # bit-exact on CPU/fp32
