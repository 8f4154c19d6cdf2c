"""Multi-crop augmentation: sizes, per-view blur/solarise probabilities, exact pipeline, seeding."""

import random
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from dino_skipless.dino import AugConfig, MultiCropAugmentation
from dino_skipless.dino import augment as aug_mod

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _image(w=48, h=40, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def _small(**kw):
    return AugConfig(global_size=32, local_size=16, **kw)


def _plain(**kw):
    """Every random photometric op off and the crop forced to the whole image."""
    base = dict(
        global_scale=(1.0, 1.0),
        local_scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        grayscale_p=0.0,
        blur_p_global1=0.0,
        blur_p_global2=0.0,
        blur_p_local=0.0,
        solarize_p_global2=0.0,
        n_local=2,
    )
    base.update(kw)
    return _small(**base)


def _to_tensor(pil):
    x = np.asarray(pil, dtype=np.float64) / 255.0
    return torch.tensor(((x - MEAN) / STD).transpose(2, 0, 1), dtype=torch.float32)


def test_defaults_are_official_dino():
    c = AugConfig()
    assert (c.global_size, c.local_size, c.n_local) == (224, 96, 8)
    assert c.global_scale == (0.4, 1.0) and c.local_scale == (0.05, 0.4)
    assert c.jitter == (0.4, 0.4, 0.2, 0.1) and (c.jitter_p, c.grayscale_p, c.flip_p) == (
        0.8,
        0.2,
        0.5,
    )
    assert (c.blur_p_global1, c.blur_p_global2, c.blur_p_local) == (1.0, 0.1, 0.5)
    assert c.blur_sigma == (0.1, 2.0) and c.solarize_p_global2 == 0.2
    assert c.mean == (0.485, 0.456, 0.406) and c.std == (0.229, 0.224, 0.225)


def test_returns_two_globals_and_n_locals_with_sizes():
    torch.manual_seed(0)
    random.seed(0)
    crops = MultiCropAugmentation(_small(n_local=3))(_image())
    assert len(crops) == 5
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)


def test_plain_pipeline_is_bicubic_resize_and_imagenet_normalisation():
    img = _image(w=40, h=40)
    crops = MultiCropAugmentation(_plain())(img)
    torch.testing.assert_close(
        crops[0], _to_tensor(img.resize((32, 32), Image.BICUBIC)), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(crops[1], crops[0])
    torch.testing.assert_close(
        crops[2], _to_tensor(img.resize((16, 16), Image.BICUBIC)), atol=1e-5, rtol=0
    )


def test_blur_and_solarize_follow_upstream_formula():
    """Solarised global view 2 equals PIL solarize(threshold 128); blurred view 1 equals a PIL
    Gaussian blur whose radius is the seeded random.uniform(0.1, 2.0) draw."""
    img = _image(w=32, h=32)
    plain = MultiCropAugmentation(_plain())(img)
    out = MultiCropAugmentation(_plain(solarize_p_global2=1.0))(img)
    torch.testing.assert_close(
        out[1], _to_tensor(ImageOps.solarize(img.resize((32, 32), Image.BICUBIC), 128))
    )
    assert not torch.allclose(out[1], plain[1])
    torch.testing.assert_close(out[0], plain[0])  # solarize only on view 2
    torch.testing.assert_close(out[2], plain[2])

    random.seed(3)
    blurred = MultiCropAugmentation(_plain(blur_p_global1=1.0, n_local=0))(img)[0]
    random.seed(3)
    random.random()  # the p-test draw comes first, then the radius
    radius = random.uniform(0.1, 2.0)
    ref = img.resize((32, 32), Image.BICUBIC).filter(ImageFilter.GaussianBlur(radius=radius))
    torch.testing.assert_close(blurred, _to_tensor(ref))


class _Spy:
    """Stands in for PIL's ImageFilter/ImageOps inside augment.py and counts calls."""

    def __init__(self):
        self.blur_radii, self.solarized = [], 0
        self.ImageFilter = types.SimpleNamespace(GaussianBlur=self._blur)
        self.ImageOps = types.SimpleNamespace(solarize=self._solarize)

    def _blur(self, radius):
        self.blur_radii.append(radius)
        return ImageFilter.GaussianBlur(radius=radius)

    def _solarize(self, img, threshold=128):
        self.solarized += 1
        return ImageOps.solarize(img, threshold)


@pytest.mark.parametrize("view", ["global1", "global2", "local"])
def test_per_view_probabilities(monkeypatch, view):
    spy = _Spy()
    monkeypatch.setattr(aug_mod, "ImageFilter", spy.ImageFilter)
    monkeypatch.setattr(aug_mod, "ImageOps", spy.ImageOps)
    aug = MultiCropAugmentation(_small(n_local=1))  # published probabilities
    img = _image(w=24, h=24)
    torch.manual_seed(0)
    random.seed(0)
    n = 400
    transform = getattr(aug, view)
    for _ in range(n):
        transform(img)
    blur_p = {"global1": 1.0, "global2": 0.1, "local": 0.5}[view]
    solar_p = {"global1": 0.0, "global2": 0.2, "local": 0.0}[view]
    # 4-sigma binomial bounds; exact for p in {0, 1}
    for count, p in [(len(spy.blur_radii), blur_p), (spy.solarized, solar_p)]:
        tol = 4 * np.sqrt(n * p * (1 - p))
        assert abs(count - n * p) <= tol, (view, count, p)
    assert all(0.1 <= r <= 2.0 for r in spy.blur_radii)


def test_grayscale_and_jitter_apply():
    img = _image(w=32, h=32)
    gray = MultiCropAugmentation(_plain(grayscale_p=1.0))(img)[0]
    raw = gray.numpy().transpose(1, 2, 0) * STD + MEAN  # undo normalisation
    np.testing.assert_allclose(raw[..., 0], raw[..., 1], atol=1e-5)
    np.testing.assert_allclose(raw[..., 0], raw[..., 2], atol=1e-5)
    torch.manual_seed(0)
    jittered = MultiCropAugmentation(_plain(jitter_p=1.0))(img)[0]
    assert not torch.allclose(jittered, MultiCropAugmentation(_plain())(img)[0])


def test_reproducible_under_torch_and_python_seeds():
    aug = MultiCropAugmentation(_small(n_local=2))
    img = _image()

    def run(seed):
        torch.manual_seed(seed)
        random.seed(seed)
        return aug(img)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_bad_input():
    with pytest.raises(TypeError, match="PIL"):
        MultiCropAugmentation(_small())(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="blur_p_local"):
        AugConfig(blur_p_local=1.5)
    with pytest.raises(ValueError, match="global_scale"):
        AugConfig(global_scale=(0.9, 0.4))
    crops = MultiCropAugmentation(_plain(n_local=0))(_image().convert("L"))  # converted to RGB
    assert len(crops) == 2 and crops[0].shape == (3, 32, 32)
