"""Fixtures shared by several test files."""

import numpy as np
import pytest
from PIL import Image


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
