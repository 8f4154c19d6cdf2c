"""Fixtures shared by several test files."""

import numpy as np
import pytest
import torch
from PIL import Image

from dino_skipless.dino.config import build_config
from dino_skipless.models import build_model

# The command-line flags of the tests' backbone (``tiny_vit``'s shape) for --random-init.
TINY_BACKBONE_ARGS = ["--arch", "vit_mini", "--depth", "2", "--patch-size", "8"]

# The config entries of that backbone and its crops, shared by the DINO and supervised runs.
TINY_MODEL = {
    "model.arch": "vit_mini",
    "model.depth": 2,
    "model.patch_size": 8,
    "aug.global_size": 32,
    "aug.local_size": 16,
    "aug.n_local": 2,
}

# The tiny DINO run of the trainer tests: vit_mini of 2 blocks on 32 px crops, 4 iterations of
# batch 4 per epoch on ``image_dir``, fp32, logged every step.
TINY_PRETRAIN = {
    **TINY_MODEL,
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


def tiny_vit(variant="skipless_init", *, seed=0, img_size=32, **overrides):
    """The tests' backbone in eval mode: vit_mini (d=128, 2 heads) of 2 blocks on 8 px patches,
    positional embeddings for ``img_size`` px (None: timm's 224 px grid)."""
    kw = {"depth": 2, "patch_size": 8, "img_size": img_size, **overrides}
    return build_model("vit_mini", variant, seed=seed, **kw).eval()


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


def smooth_image(rng: np.random.Generator, size=(40, 40)) -> Image.Image:
    """6x6 random colours upsampled bicubically: an RGB image whose crops all differ."""
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def write_image_folder(root, seed=0, n=16):
    """``n`` smooth 40x40 PNGs in two class folders (a tiny ImageFolder for the trainer)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        smooth_image(rng).save(d / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """16 smooth random RGB images in two class folders (``write_image_folder``, seed 0)."""
    return write_image_folder(tmp_path_factory.mktemp("imgs"))
