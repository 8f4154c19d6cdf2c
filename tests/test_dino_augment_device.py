"""Device multi-crop path: each op vs torchvision / PIL, parameters vs the official draws and
distributions, reproducibility from (seed, epoch, index), bad input."""

from __future__ import annotations

import math
import random
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter, ImageOps
from scipy import stats
from torchvision import transforms

from dino_skipless.data import DatasetError, ImageFolderDataset
from dino_skipless.dino import AugConfig, MultiCropAugmentation
from dino_skipless.dino import augment as aug_mod
from dino_skipless.dino import augment_device as dev_aug
from dino_skipless.dino.augment_device import (
    FACTORS,
    GRAY,
    HEIGHT,
    JITTER,
    ORDER,
    SIGMA,
    WIDTH,
    SeededDecode,
    collate_decoded,
    device_multicrop,
    resample_weights,
    sample_params,
)
from dino_skipless.dino.config import ConfigError, build_config

STD = torch.tensor(AugConfig().std).view(3, 1, 1)


def _smooth(w=160, h=120, seed=0, cell=20) -> Image.Image:
    """A photo-like image: bicubic-upsampled noise (smooth, full range)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // cell), max(2, w // cell), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def _chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0


def _one_batch(img: Image.Image, params: torch.Tensor, scale=(1.0, 1.0)) -> dict:
    pixels = torch.from_numpy(np.array(img))
    return collate_decoded([(pixels, params, torch.tensor(scale, dtype=torch.float64))])


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------
# Each op against the reference op on one sample with the same parameters
# ---------------------------------------------------------------------------------------------


def _resize(x, top, left, h, w, out, flip=False):
    wy = resample_weights(torch.tensor([float(top)]), torch.tensor([float(h)]), out, x.shape[1])
    wx = resample_weights(torch.tensor([float(left)]), torch.tensor([float(w)]), out, x.shape[2])
    wx = wx.flip(1) if flip else wx
    return (wy[0] @ x @ wx[0].T).clamp(0, 1)


@pytest.mark.parametrize(
    "box",
    [(0, 0, 120, 160, 64), (5, 7, 100, 90, 64), (30, 40, 20, 25, 64), (3, 2, 117, 150, 24)]
    + [(10, 10, 7, 9, 16), (0, 0, 120, 160, 200)],
)
@pytest.mark.parametrize("flip", [False, True])
def test_resized_crop_matches_pil_antialiased_bicubic(box, flip):
    """Crop + bicubic resize (+ flip) as torchvision's F.resized_crop on a PIL image, i.e.
    PIL's antialiased resize: within PIL's two uint8 roundings (<= 1.25/255, mean <= 0.4/255)."""
    top, left, h, w, out = box
    img = _smooth()
    ref = img.crop((left, top, left + w, top + h)).resize((out, out), Image.BICUBIC)
    if flip:
        ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
    diff = (_resize(_chw(img), top, left, h, w, out, flip) - _chw(ref)).abs() * 255
    assert diff.max() <= 1.25 and diff.mean() <= 0.4, (diff.max(), diff.mean())


def test_resize_tolerance_catches_missing_antialias():
    """Non-vacuous: a plain (non-antialiased) bicubic downscale of a detailed image fails the
    bound above."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    ref = _chw(img.resize((32, 32), Image.BICUBIC))
    ours = _resize(_chw(img), 0, 0, 128, 128, 32)
    plain = F.interpolate(_chw(img)[None], size=(32, 32), mode="bicubic", antialias=False)[0]
    assert (ours - ref).abs().max() * 255 <= 1.25
    assert (plain.clamp(0, 1) - ref).abs().max() * 255 > 20


@pytest.mark.parametrize(
    "op,ref,lo,hi",
    [
        (dev_aug.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (dev_aug.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (dev_aug.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
        (dev_aug.adjust_hue, TF.adjust_hue, -0.1, 0.1),
    ],
)
def test_jitter_ops_match_torchvision_per_sample(op, ref, lo, hi):
    torch.manual_seed(0)
    x = torch.rand(5, 3, 12, 10)
    x[0] = x[0, :1]  # a gray image: hue's max == min branch
    f = torch.empty(5).uniform_(lo, hi)
    got = op(x, f)
    want = torch.stack([ref(x[k], float(f[k])) for k in range(5)])
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    assert not torch.allclose(got, x, atol=1e-3)  # the factors really changed the images


def test_grayscale_and_solarize_match_torchvision():
    torch.manual_seed(1)
    x = torch.rand(3, 3, 8, 8)
    gray = dev_aug.rgb_to_grayscale(x).expand_as(x)
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(x, num_output_channels=3))
    torch.testing.assert_close(dev_aug.solarize(x), TF.solarize(x, 128 / 255))
    # PIL: values >= 128 are inverted
    img = _smooth(16, 16)
    torch.testing.assert_close(dev_aug.solarize(_chw(img)), _chw(ImageOps.solarize(img, 128)))


def test_gaussian_blur_matches_torchvision_and_pil():
    img = _smooth(64, 48, seed=2, cell=4)
    x = _chw(img)[None].repeat(2, 1, 1, 1)
    sigma = torch.tensor([0.4, 1.7])
    got = dev_aug.gaussian_blur(x, sigma, max_sigma=2.0)
    for k in range(2):
        want = TF.gaussian_blur(x[k], [13, 13], [float(sigma[k])])  # reflect-padded
        inner = (slice(None), slice(6, -6), slice(6, -6))
        torch.testing.assert_close(got[k][inner], want[inner], atol=1e-5, rtol=0)
        # PIL's GaussianBlur(radius) = 3 box blurs of the same variance (the official op)
        pil = _chw(img.filter(ImageFilter.GaussianBlur(radius=float(sigma[k]))))
        diff = (got[k] - pil).abs() * 255
        assert diff.mean() <= 1.0 and diff.max() <= 6, (diff.mean(), diff.max())
    assert (got[1] - x[1]).abs().mean() * 255 > 2  # blurred for real


def test_jitter_runs_in_each_samples_order():
    """Sample 0 brightness->hue, sample 1 hue->brightness: each equals the sequential
    torchvision ops in its own order (and the two orders give different images)."""
    torch.manual_seed(2)
    x = torch.rand(1, 3, 8, 8).repeat(2, 1, 1, 1)
    p = torch.full((2, dev_aug.N_PARAMS), math.nan, dtype=torch.float64)
    p[:, JITTER], p[:, GRAY], p[:, dev_aug.BLUR], p[:, dev_aug.SOLARIZE] = 1, 0, 0, 0
    p[0, ORDER] = torch.tensor([0.0, 3.0, 1.0, 2.0])
    p[1, ORDER] = torch.tensor([3.0, 0.0, 1.0, 2.0])
    p[:, FACTORS] = torch.tensor([1.35, 1.0, 1.0, 0.08], dtype=torch.float64)
    got = dev_aug.photometric(x, p, AugConfig())
    bh = TF.adjust_hue(TF.adjust_brightness(x[0], 1.35), 0.08)
    hb = TF.adjust_brightness(TF.adjust_hue(x[0], 0.08), 1.35)
    torch.testing.assert_close(got[0], bh, atol=2e-6, rtol=0)
    torch.testing.assert_close(got[1], hb, atol=2e-6, rtol=0)
    assert (bh - hb).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# The parameters are the official draws, and follow the official distributions
# ---------------------------------------------------------------------------------------------


class _Recorder:
    """Records what the official pipeline draws (crop boxes, jitter params, blur radii)."""

    def __init__(self, monkeypatch):
        self.crops, self.jitters, self.radii, self.solarized = [], [], [], 0
        crop_fn = transforms.RandomResizedCrop.get_params
        jitter_fn = transforms.ColorJitter.get_params

        def crop(img, scale, ratio):
            self.crops.append(crop_fn(img, scale, ratio))
            return self.crops[-1]

        def jitter(*a):
            self.jitters.append(jitter_fn(*a))
            return self.jitters[-1]

        def blur(radius):
            self.radii.append(radius)
            return ImageFilter.GaussianBlur(radius=radius)

        def solar(img, threshold=128):
            self.solarized += 1
            return ImageOps.solarize(img, threshold)

        monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(crop))
        monkeypatch.setattr(transforms.ColorJitter, "get_params", staticmethod(jitter))
        monkeypatch.setattr(aug_mod, "ImageFilter", type("IF", (), {"GaussianBlur": blur}))
        monkeypatch.setattr(aug_mod, "ImageOps", type("IO", (), {"solarize": solar}))


def test_parameters_are_the_official_pipelines_draws(monkeypatch):
    """Same torch/Python RNG state -> the very crop boxes, jitter order/factors and blur radii
    that MultiCropAugmentation draws (so crops depend on (seed, epoch, index) as before)."""
    cfg = AugConfig(global_size=16, local_size=8, n_local=3)
    img = _smooth(50, 40)
    rec = _Recorder(monkeypatch)
    aug = MultiCropAugmentation(cfg)
    official = []
    for seed in range(20):
        _seeded(seed)
        n_crops, n_jit, n_rad = len(rec.crops), len(rec.jitters), len(rec.radii)
        aug(img)
        official.append((rec.crops[n_crops:], rec.jitters[n_jit:], rec.radii[n_rad:]))
    monkeypatch.undo()
    for seed, (crops, jitters, radii) in enumerate(official):
        _seeded(seed)
        p = sample_params(cfg, img.height, img.width)
        assert [tuple(int(v) for v in row[:4]) for row in p] == [tuple(c) for c in crops]
        jit = p[p[:, JITTER] > 0.5]
        assert len(jit) == len(jitters)
        for row, (order, *factors) in zip(jit, jitters):
            assert row[ORDER].tolist() == order.tolist()
            assert row[FACTORS].tolist() == [float(f) for f in factors]
        assert p[p[:, dev_aug.BLUR] > 0.5, SIGMA].tolist() == radii


def _official_draws(monkeypatch, cfg, img, seeds):
    rec = _Recorder(monkeypatch)
    aug, v = MultiCropAugmentation(cfg), 2 + cfg.n_local
    blur_views, solar = [], 0
    for seed in seeds:
        _seeded(seed)
        n = len(rec.radii)
        s0 = rec.solarized
        for k, t in enumerate([aug.global1, aug.global2] + [aug.local] * cfg.n_local):
            before = len(rec.radii)
            t(img)
            blur_views.append((k, len(rec.radii) > before))
        assert len(rec.radii) >= n
        solar += rec.solarized - s0
    monkeypatch.undo()
    crops = np.array(rec.crops, dtype=float).reshape(len(seeds), v, 4)
    blur = np.array([b for _, b in blur_views]).reshape(len(seeds), v)
    return crops, len(rec.jitters), blur, solar, rec.jitters


def _scale_logratio(hw: np.ndarray, area: float):
    return hw[..., 0] * hw[..., 1] / area, np.log(hw[..., 1] / hw[..., 0])


@pytest.mark.slow
def test_parameter_distributions_match_the_cpu_path(monkeypatch):
    """Independent seeds for the two paths: crop scale / aspect (two-sample KS), jitter factors
    (KS) and every Bernoulli rate (binomial test vs the official probability) agree; a wrong
    crop range is rejected by the same tests (power check)."""
    cfg = AugConfig(global_size=16, local_size=8, n_local=2)
    img = _smooth(50, 40)
    area, n = 50 * 40, 600
    crops, n_jit, blur_cpu, solar_cpu, jit_cpu = _official_draws(monkeypatch, cfg, img, range(n))

    def draw(c, seeds):
        out = []
        for seed in seeds:
            _seeded(seed)
            out.append(sample_params(c, 40, 50))
        return torch.stack(out).numpy()

    dev = draw(cfg, range(10_000, 10_000 + n))
    wrong = draw(
        AugConfig(global_size=16, local_size=8, n_local=2, global_scale=(0.3, 1.0)), range(n)
    )
    for views in (slice(0, 2), slice(2, 4)):
        s_cpu, r_cpu = _scale_logratio(crops[:, views, 2:], area)
        s_dev, r_dev = _scale_logratio(dev[:, views][..., [HEIGHT, WIDTH]], area)
        assert stats.ks_2samp(s_cpu.ravel(), s_dev.ravel()).pvalue > 1e-3
        assert stats.ks_2samp(r_cpu.ravel(), r_dev.ravel()).pvalue > 1e-3
    s_wrong, _ = _scale_logratio(wrong[:, :2][..., [HEIGHT, WIDTH]], area)
    s_cpu, _ = _scale_logratio(crops[:, :2, 2:], area)
    assert stats.ks_2samp(s_cpu.ravel(), s_wrong.ravel()).pvalue < 1e-6
    # jitter factors: brightness ... hue
    fac_cpu = np.array([[float(f) for f in j[1:]] for j in jit_cpu])
    jit_dev = dev[dev[..., JITTER] > 0.5]
    for k in range(4):
        assert stats.ks_2samp(fac_cpu[:, k], jit_dev[:, FACTORS][:, k]).pvalue > 1e-3
    first_op = np.bincount(jit_dev[:, ORDER][:, 0].astype(int), minlength=4)
    assert stats.chisquare(first_op).pvalue > 1e-3  # a uniform random order

    def rate_ok(count, total, p):
        if p in (0.0, 1.0):
            return count == total * p
        return stats.binomtest(int(count), total, p).pvalue > 1e-3

    views = 2 + cfg.n_local
    assert rate_ok(n_jit, n * views, cfg.jitter_p)
    assert rate_ok((dev[..., JITTER] > 0.5).sum(), n * views, cfg.jitter_p)
    assert rate_ok((dev[..., dev_aug.FLIP] > 0.5).sum(), n * views, cfg.flip_p)
    assert rate_ok((dev[..., GRAY] > 0.5).sum(), n * views, cfg.grayscale_p)
    for k, p in [(0, 1.0), (1, 0.1), (2, 0.5), (3, 0.5)]:
        assert rate_ok(blur_cpu[:, k].sum(), n, p)
        assert rate_ok((dev[:, k, dev_aug.BLUR] > 0.5).sum(), n, p)
    assert rate_ok(solar_cpu, n, 0.2)
    assert rate_ok((dev[:, 1, dev_aug.SOLARIZE] > 0.5).sum(), n, 0.2)
    assert (dev[:, [0, 2, 3], dev_aug.SOLARIZE] > 0.5).sum() == 0
    sig = dev[..., SIGMA][dev[..., dev_aug.BLUR] > 0.5]
    assert stats.kstest(sig, stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3
    assert not rate_ok(int(0.3 * n), n, 0.2)  # the rate test has power at this n


# ---------------------------------------------------------------------------------------------
# The whole device pipeline vs the official pipeline, seeding, batching, bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 60), (60, 80)])
def test_device_crops_match_the_official_crops(size):
    """Same seeds -> the device crops equal the official PIL crops up to uint8 rounding and
    PIL's quantised hue and box blur: mean |diff| <= 4/255 per crop (1/255 unjittered); another
    seed's parameters are far off (the comparison can fail). A portrait image (60 x 80) lies
    transposed on the canvas and its crops are transposed back."""
    cfg = AugConfig(global_size=32, local_size=16, n_local=3)
    img = _smooth(*size, seed=3)
    aug = MultiCropAugmentation(cfg)
    for seed in range(8):
        _seeded(seed)
        ref = aug(img)
        _seeded(seed)
        p = sample_params(cfg, img.height, img.width)
        out = device_multicrop(_one_batch(img, p), cfg, "cpu")
        for k, (r, o) in enumerate(zip(ref, out)):
            diff = ((r - o[0]) * STD).abs().mean() * 255
            assert diff <= (4.0 if p[k, JITTER] else 1.0), (seed, k, float(diff))
    _seeded(99)
    other = device_multicrop(_one_batch(img, sample_params(cfg, img.height, img.width)), cfg, "cpu")
    assert ((ref[0] - other[0][0]) * STD).abs().mean() * 255 > 10


def _reference_photometric(x: torch.Tensor, row: torch.Tensor, cfg: AugConfig) -> torch.Tensor:
    """One crop through torchvision's functional ops in the view's sampled order (the official
    Compose), with a true Gaussian for the blur."""
    if row[JITTER] > 0.5:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for k in row[ORDER].tolist():
            f = float(row[FACTORS][int(k)])
            if not math.isnan(f):
                x = ops[int(k)](x, f)
    if row[GRAY] > 0.5:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if row[dev_aug.BLUR] > 0.5:
        x = dev_aug.gaussian_blur(x[None], row[SIGMA : SIGMA + 1].float(), cfg.blur_sigma[1])[0]
    if row[dev_aug.SOLARIZE] > 0.5:
        x = TF.solarize(x, 128 / 255)
    return x


def test_batched_photometric_is_each_views_sequence_of_ops():
    """The masked batched ops (six linear jitter passes around one hue pass, masked
    grayscale, grouped-convolution blur, masked solarise) equal each view's own sequence of
    torchvision ops, for 200 views with sampled parameters (every op order occurs)."""
    cfg = AugConfig(global_size=16, local_size=8, n_local=8)
    rows = []
    for seed in range(20):
        _seeded(seed)
        rows.append(sample_params(cfg, 40, 50))
    p = torch.cat(rows)
    p[::7, dev_aug.SOLARIZE] = 1.0  # exercise solarise beyond its 2 % rate
    assert len({tuple(r) for r in p[p[:, JITTER] > 0.5][:, ORDER].tolist()}) >= 20
    x = torch.rand(len(p), 3, 12, 12, generator=torch.Generator().manual_seed(0))
    got = dev_aug.photometric(x, p, cfg)
    want = torch.stack([_reference_photometric(x[k], p[k], cfg) for k in range(len(p))])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert (got - x).abs().amax((1, 2, 3)).min() > 0 or (p[:, JITTER] < 0.5).any()


def test_portrait_images_lie_transposed_on_a_landscape_canvas():
    """A 4:3 and a 3:4 image share a 3 x 4 canvas (not 4 x 4); the plan's boxes are swapped."""
    cfg = AugConfig(global_size=16, local_size=8, n_local=1)
    _seeded(0)
    p = sample_params(cfg, 60, 80)
    land = (torch.zeros(60, 80, 3, dtype=torch.uint8), p, torch.ones(2, dtype=torch.float64))
    port = (torch.zeros(80, 60, 3, dtype=torch.uint8), p, torch.ones(2, dtype=torch.float64))
    batch = collate_decoded([land, port], cfg)
    assert [tuple(c.shape) for c in batch["canvases"]] == [(2, 60, 80, 3)]
    plan = batch["plan"]
    torch.testing.assert_close(plan[1, :, dev_aug.P_Y0], plan[0, :, dev_aug.P_X0])
    torch.testing.assert_close(plan[1, :, dev_aug.P_XLEN], plan[0, :, dev_aug.P_YLEN])
    assert plan[:, :, dev_aug.P_TRANS].tolist() == [[0.0] * 3, [1.0] * 3]


def _padded(hw, groups):
    return sum(len(g) * max(hw[k][0] for k in g) * max(hw[k][1] for k in g) for g in groups)


def test_canvas_groups_is_the_least_padding_of_every_split():
    """canvas_groups against a brute force over every split of the (w, h)-sorted images into
    1-3 contiguous canvases, with the same per-canvas penalty; each image in exactly one."""
    import itertools

    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(1, 9))
        hw = [tuple(sorted(map(int, rng.integers(10, 200, size=2)))) for _ in range(n)]
        if trial % 3 == 0:
            hw[int(rng.integers(n))] = (900, 1200)  # an outlier
        groups = dev_aug.canvas_groups(hw, max_groups=3)
        assert sorted(k for g in groups for k in g) == list(range(n))
        order = sorted(range(n), key=lambda k: (hw[k][1], hw[k][0], k))
        penalty = dev_aug.CANVAS_SAVING * sum(h * w for h, w in hw)
        best = min(
            _padded(hw, [order[i:j] for i, j in zip((0, *cuts), (*cuts, n))]) + penalty * len(cuts)
            for m in range(min(3, n))
            for cuts in itertools.combinations(range(1, n), m)
        )
        assert _padded(hw, groups) + penalty * (len(groups) - 1) == pytest.approx(best)
    hw = [(375, 500)] * 63 + [(1125, 1500)]  # one outlier: a canvas of its own
    assert sorted(map(len, dev_aug.canvas_groups(hw))) == [1, 63]
    assert dev_aug.canvas_groups([(375, 500)] * 8) == [list(range(8))]  # equal sizes: one
    assert len(dev_aug.canvas_groups(hw, max_groups=1)) == 1


@pytest.mark.parametrize("max_canvases", [2, 1])
def test_an_outlier_gets_its_own_canvas_and_changes_no_crop(monkeypatch, max_canvases):
    """A 4x larger image lies on a canvas of its own (or, with one canvas allowed, pads the
    others); either way each sample's crops equal those it gets alone, in batch order."""
    monkeypatch.setattr(dev_aug, "MAX_CANVASES", max_canvases)
    cfg = AugConfig(global_size=16, local_size=8, n_local=2)
    sizes = [(40, 30), (160, 120), (30, 40), (40, 30)]  # (w, h); sample 1 is the outlier
    items = []
    for k, (w, h) in enumerate(sizes):
        _seeded(k)
        pixels = torch.from_numpy(np.array(_smooth(w, h, seed=k)))
        items.append((pixels, sample_params(cfg, h, w), torch.ones(2, dtype=torch.float64)))
    batch = collate_decoded(items, cfg)
    if max_canvases == 1:
        assert [tuple(c.shape[:3]) for c in batch["canvases"]] == [(4, 120, 160)]
        assert "order" not in batch  # batch order on the canvas
    else:
        assert [tuple(c.shape[:3]) for c in batch["canvases"]] == [(3, 30, 40), (1, 120, 160)]
        assert batch["order"].tolist() == [0, 2, 3, 1]
        assert batch["order"][batch["inverse"]].tolist() == [0, 1, 2, 3]
    together = device_multicrop(batch, cfg, "cpu")
    # the taps sized by the longest crop side give the crops of taps sized by the canvas
    assert 0 < batch["window"][1] < batch["window"][0] <= 160
    unsized = device_multicrop({**batch, "window": (0.0, 0.0)}, cfg, "cpu")
    for x, y in zip(together, unsized):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    for k, item in enumerate(items):
        alone = device_multicrop(collate_decoded([item], cfg), cfg, "cpu")
        for x, y in zip(together, alone):
            torch.testing.assert_close(x[k], y[0], atol=1e-5, rtol=0)


def test_decode_max_side_caps_big_images_and_stays_close(tmp_path):
    """data.decode_max_side=N: a 600 x 450 JPEG is decoded at 200 x 150 (libjpeg draft, then
    PIL's antialiased resize); the parameters are the full-size draws, and the crops of the
    capped decode stay within 0.5/255 (mean per pixel) of the full-size decode's, an order below
    the device path's own deviation from PIL (<= 1/255): every crop is still a downscale."""
    d = tmp_path / "big" / "a"
    d.mkdir(parents=True)
    _smooth(600, 450, seed=5, cell=60).save(d / "0.jpg", quality=95)
    cfg = AugConfig(global_size=32, local_size=16, n_local=4)
    base = ImageFolderDataset(d.parent)
    full, capped = SeededDecode(base, cfg, 0), SeededDecode(base, cfg, 0, max_side=200)
    (px_f, p_f, _), (px_c, p_c, s_c) = full[(0, 0)], capped[(0, 0)]
    assert px_f.shape == (450, 600, 3) and px_c.shape == (150, 200, 3)
    assert s_c.tolist() == [1 / 3, 1 / 3]
    torch.testing.assert_close(p_f, p_c, rtol=0, atol=0, equal_nan=True)
    a = device_multicrop(collate_decoded([full[(0, 0)]], cfg), cfg, "cpu")
    b = device_multicrop(collate_decoded([capped[(0, 0)]], cfg), cfg, "cpu")
    diffs = [float(((x - y) * STD).abs().mean() * 255) for x, y in zip(a, b)]
    assert max(diffs) <= 0.5, diffs
    # not vacuous: the 1/8-scale draft alone (75 x 56, crops upsampled) is far off
    drafted = SeededDecode(base, cfg, 0, draft=56)
    c = device_multicrop(collate_decoded([drafted[(0, 0)]], cfg), cfg, "cpu")
    assert max(float(((x - y) * STD).abs().mean() * 255) for x, y in zip(a, c)) > 1.0
    assert dev_aug.capped_size(600, 450, 200) == (200, 150)
    assert dev_aug.capped_size(100, 450, 200) == (44, 200)
    assert dev_aug.capped_size(100, 150, 200) == (100, 150)


def test_decode_on_device_matches_the_worker_decode(tmp_path):
    """data.decode_on=device (here torchvision's CPU decode_jpeg in the training process): the
    same crops as PIL's decode in the worker, PNGs decoded by the worker in the same batch."""
    d = tmp_path / "mix" / "a"
    d.mkdir(parents=True)
    _smooth(64, 48, seed=6).save(d / "0.jpg", quality=95)
    _smooth(40, 56, seed=7).save(d / "1.jpg", quality=95)
    _smooth(50, 40, seed=8).save(d / "2.png")
    _smooth(300, 200, seed=9).save(d / "3.jpg", quality=95)
    cfg = AugConfig(global_size=16, local_size=8, n_local=2)
    base = ImageFolderDataset(d.parent)
    worker = SeededDecode(base, cfg, 0, max_side=100)
    device = SeededDecode(base, cfg, 0, max_side=100, encoded=True)
    enc = collate_decoded([device[(0, i)] for i in range(4)], cfg)
    assert [t.dim() for t in enc["encoded"]] == [1, 1, 3, 1]  # the PNG comes decoded
    assert enc["hw"] == [(48, 64), (56, 40), (40, 50), (67, 100)]
    assert enc["groups"] == [[0, 1, 2], [3]]  # the larger decode on a canvas of its own
    a = device_multicrop(collate_decoded([worker[(0, i)] for i in range(4)], cfg), cfg, "cpu")
    b = device_multicrop(enc, cfg, "cpu")
    for x, y in zip(a, b):
        assert ((x - y) * STD).abs().mean() * 255 < 0.5


def test_augmentation_op_count_is_at_most_the_model_forwards():
    """Launch-bound no more: the aten ops one batch of crops costs (top-level, as the profiler
    lists them; independent of the batch and image sizes, but each canvas adds its resampling)
    are no more than the ViT-S/16 student's forward on those crops (427 with two canvases vs 430
    when written; the residual-free variant, whose forward has the fewest ops)."""
    from dino_skipless.dino.opcount import count_aten_ops
    from dino_skipless.dino.trainer import build_student_teacher

    cfg = AugConfig(global_size=32, local_size=16, n_local=8)  # the paper's 2 + 8 views
    items = []
    for seed, (w, h) in enumerate([(50, 40)] * 3 + [(200, 160)]):  # an outlier: the worst case
        _seeded(seed)
        items.append(_one_batch(_smooth(w, h, seed=seed), sample_params(cfg, h, w)))
    batch = collate_decoded(
        [(im["canvases"][0][0], im["params"][0], im["scale"][0]) for im in items], cfg
    )
    assert len(batch["canvases"]) == dev_aug.MAX_CANVASES  # each canvas adds its own ops
    crops = device_multicrop(batch, cfg, "cpu")
    # ViT-S/16's graph (12 blocks, patch 16, the 3-layer head) at a width that builds in a blink
    shape = {"model.arch": "vit_mini", "model.depth": 12, "model.patch_size": 16}
    small = {"dino.out_dim": 256, "dino.head_hidden_dim": 64, "dino.head_bottleneck_dim": 32}
    sizes = {"aug.global_size": 32, "aug.local_size": 16, "model.variant": "skipless"}
    student, _ = build_student_teacher(build_config(None, {**shape, **small, **sizes}))
    with torch.no_grad():
        model = count_aten_ops(lambda: student(crops))[0]
    aug = count_aten_ops(lambda: device_multicrop(batch, cfg, "cpu"))[0]
    print(f"augmentation {aug} aten ops per batch, ViT-S/16 student forward {model}")
    assert aug <= model, (aug, model)


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs" / "a"
    d.mkdir(parents=True)
    for i, (w, h) in enumerate([(40, 30), (32, 48), (64, 40), (50, 50)]):
        _smooth(w, h, seed=i).save(d / f"{i}.jpg", quality=95)
    return d.parent


def test_seeded_decode_depends_only_on_seed_epoch_index(image_dir):
    cfg = AugConfig(global_size=16, local_size=8, n_local=2)
    ds = SeededDecode(ImageFolderDataset(image_dir), cfg, seed=0)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = ds[(1, 2)]
    torch.rand(3)
    b = ds[(1, 2)]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(ds[(2, 2)][1][:, :4], a[1][:, :4])  # another epoch: other crops
    torch.manual_seed(5)
    ds[(0, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    # a sample's crops do not depend on its batch (canvas size, companions): N processes with
    # B/N per batch see the crops one process with batch B sees
    big = device_multicrop(collate_decoded([ds[(0, i)] for i in range(4)]), cfg, "cpu")
    small = device_multicrop(collate_decoded([ds[(0, 3)], ds[(0, 1)]]), cfg, "cpu")
    for x, y in zip(big, small):
        torch.testing.assert_close(x[3], y[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(x[1], y[1], atol=1e-5, rtol=0)
    assert [tuple(c.shape) for c in big] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2


def test_draft_decode_keeps_parameters_and_is_close(tmp_path):
    """decode_draft=N decodes a JPEG at a libjpeg scale with both sides >= N; parameters are
    sampled on the full size (identical) and the crops stay close to the full decode."""
    d = tmp_path / "big" / "a"
    d.mkdir(parents=True)
    _smooth(400, 300, seed=4).save(d / "0.jpg", quality=95)
    cfg = AugConfig(global_size=32, local_size=16, n_local=2)
    base = ImageFolderDataset(d.parent)
    full, draft = SeededDecode(base, cfg, 0), SeededDecode(base, cfg, 0, draft=100)
    (px_f, p_f, s_f), (px_d, p_d, s_d) = full[(0, 0)], draft[(0, 0)]
    assert px_f.shape == (300, 400, 3) and px_d.shape == (150, 200, 3)
    assert s_f.tolist() == [1.0, 1.0] and s_d.tolist() == [0.5, 0.5]
    torch.testing.assert_close(p_f, p_d, rtol=0, atol=0, equal_nan=True)
    a = device_multicrop(collate_decoded([full[(0, 0)]]), cfg, "cpu")
    b = device_multicrop(collate_decoded([draft[(0, 0)]]), cfg, "cpu")
    for x, y in zip(a, b):
        assert ((x - y) * STD).abs().mean() * 255 < 3


def test_bad_images_are_reported_by_path(tmp_path):
    d = tmp_path / "bad" / "a"
    d.mkdir(parents=True)
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    cfg = AugConfig(global_size=16, local_size=8, n_local=0)
    for draft in (0, 64):
        ds = SeededDecode(ImageFolderDataset(d.parent), cfg, 0, draft=draft)
        with pytest.raises(DatasetError, match="broken.jpg"):
            ds[(0, 0)]


def test_a_decompression_bomb_is_a_bad_image_on_every_decode_path(tmp_path):
    """PIL, the draft/capped decode and decode_on=device's header read all go through
    data.files.read_image: a bomb is a DatasetError naming it (read_jpeg's own Image.open let
    PIL's DecompressionBombError through)."""
    d = tmp_path / "bomb" / "a"
    d.mkdir(parents=True)
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 4e8 px, no pixel data

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
    (d / "bomb.png").write_bytes(png)
    cfg = AugConfig(global_size=16, local_size=8, n_local=0)
    for kw in ({}, {"draft": 64}, {"max_side": 100}, {"encoded": True}):
        ds = SeededDecode(ImageFolderDataset(d.parent), cfg, 0, **kw)
        with pytest.raises(DatasetError, match="bomb.png.*decompression-bomb limit"):
            ds[(0, 0)]


def test_config_choices():
    from dino_skipless.dino.config import augment_on_for

    cfg = build_config(None, {})
    assert cfg.data.augment_on == "auto"  # the device path on CUDA, the official one on a CPU
    assert augment_on_for(cfg.data, "cpu") == "cpu"
    assert augment_on_for(cfg.data, torch.device("cuda", 0)) == "device"
    cpu = build_config(None, {"data.augment_on": "cpu"}).data
    assert augment_on_for(cpu, "cuda") == "cpu"  # the bit-exact official path, when asked
    with pytest.raises(ConfigError, match="data.augment_on='gpu' is not valid"):
        build_config(None, {"data.augment_on": "gpu"})
    for bad in (
        {"data.decode_draft": 256},
        {"data.decode_max_side": 512},
        {"data.decode_on": "device"},
    ):
        with pytest.raises(ConfigError, match="needs data.augment_on=device or auto"):
            build_config(None, {"data.augment_on": "cpu", **bad})
    with pytest.raises(ConfigError, match="decode_draft is a libjpeg option"):
        build_config(None, {"data.decode_on": "device", "data.decode_draft": 256})
    cfg = build_config(None, {"data.augment_on": "device", "data.decode_draft": 256})
    assert cfg.data.decode_draft == 256
