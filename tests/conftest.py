"""Fixtures shared by several test files."""

import numpy as np
import pytest
import torch
from PIL import Image

from dino_skipless.dino.config import build_config

# The tiny DINO run of the trainer tests: vit_mini of 2 blocks on 32 px crops, 4 iterations of
# batch 4 per epoch on ``image_dir``, fp32, logged every step.
TINY_PRETRAIN = {
    "model.arch": "vit_mini",
    "model.depth": 2,
    "model.patch_size": 8,
    "aug.global_size": 32,
    "aug.local_size": 16,
    "aug.n_local": 2,
    "dino.out_dim": 256,
    "dino.head_hidden_dim": 64,
    "dino.head_bottleneck_dim": 32,
    "data.batch_size_per_gpu": 4,
    "data.num_workers": 0,
    "optim.epochs": 2,
    "optim.warmup_epochs": 1,
    "optim.lr": 0.02,  # scaled to 0.02 * 4 / 256: big enough for the weights to move
    "run.precision": "fp32",
    "run.log_every": 1,
    "run.progress": False,
    "run.tensorboard": False,
    "run.keep_epochs": [1],
}


def tiny_pretrain_config(out, data, base: dict = TINY_PRETRAIN, **extra):
    """``PretrainConfig`` of ``base`` training on the ImageFolder ``data`` into ``out``."""
    return build_config(None, {**base, "data.path": str(data), "run.out": str(out), **extra})


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is faster, and LAPACK (the paper init's SVDs) can crawl
    with two threads on a busy 2-core machine. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """16 smooth random RGB images in two class folders (a tiny ImageFolder for the trainer)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(16):
        d = root / f"class{i % 2}"
        d.mkdir(exist_ok=True)
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40, 40), Image.BICUBIC).save(d / f"{i:02d}.png")
    return root
