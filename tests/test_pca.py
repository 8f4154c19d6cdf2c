import json

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE_ARGS, tiny_vit
from PIL import Image
from sklearn.decomposition import PCA

from dino_skipless import pca as pca_cli
from dino_skipless import pca_figure
from dino_skipless.pca_lib import (
    PCAConfig,
    fit_pca,
    pca_rgb,
    resize_center_crop,
    upsample,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def low_rank_features(b, n, d, seed=0):
    """Features with well-separated leading variances, so PCA axes are unique up to sign."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0][:, :5]
    scores = rng.normal(size=(b * n, 5)) * np.array([9.0, 5.0, 3.0, 1.0, 0.5])
    x = scores @ basis.T + 0.05 * rng.normal(size=(b * n, d)) + rng.normal(size=d)
    return x.reshape(b, n, d)


def sklearn_rgb(x2d):
    """Reference: sklearn PCA(3), sign = largest |loading| positive, then per-component min-max."""
    p = PCA(3, svd_solver="full").fit(x2d)
    s = p.transform(x2d)
    comps = p.components_
    signs = np.sign(comps[np.arange(3), np.abs(comps).argmax(1)])
    s = s * signs
    return (s - s.min(0)) / (s.max(0) - s.min(0)), comps * signs[:, None], p


def test_joint_colours_match_sklearn():
    x = low_rank_features(4, 36, 24)
    out = pca_rgb(torch.tensor(x, dtype=torch.float32), (6, 6), PCAConfig())
    want, comps, p = sklearn_rgb(x.reshape(-1, 24).astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(out.rgb.reshape(-1, 3), want, atol=1e-5)
    fit = fit_pca(x.reshape(-1, 24))
    np.testing.assert_allclose(fit.components.numpy(), comps, atol=1e-8)
    np.testing.assert_allclose(
        out.explained_variance_ratio[0], p.explained_variance_ratio_, rtol=1e-4
    )
    # The documented sign convention: each axis's largest-magnitude loading is positive.
    c = fit.components.numpy()
    assert (c[np.arange(3), np.abs(c).argmax(1)] > 0).all()


def test_sign_convention_is_invariant_to_feature_sign():
    x = low_rank_features(2, 16, 10, seed=3)
    a = pca_rgb(torch.tensor(x), (4, 4)).rgb
    b = pca_rgb(torch.tensor(-x), (4, 4)).rgb
    # Negating the data flips every score; the convention flips the axes back only where the
    # largest loading changes sign too -- which it does -- so colours become 1 - colours.
    np.testing.assert_allclose(a, 1 - b, atol=1e-6)


def test_per_image_vs_joint():
    x = low_rank_features(3, 25, 12, seed=1)
    x[1] = x[1] * 0.1 + 2.0  # one image with a much smaller spread
    joint = pca_rgb(torch.tensor(x), (5, 5), PCAConfig(fit="joint")).rgb
    per = pca_rgb(torch.tensor(x), (5, 5), PCAConfig(fit="per-image")).rgb
    for i in range(3):
        np.testing.assert_allclose(per[i].reshape(-1, 3).min(0), 0, atol=1e-7)
        np.testing.assert_allclose(per[i].reshape(-1, 3).max(0), 1, atol=1e-7)
        want, _, _ = sklearn_rgb(x[i])
        np.testing.assert_allclose(per[i].reshape(-1, 3), want, atol=1e-6)
    # Joint: [0, 1] is spanned over all images together, not by the small-spread image.
    np.testing.assert_allclose(joint.reshape(-1, 3).min(0), 0, atol=1e-7)
    np.testing.assert_allclose(joint.reshape(-1, 3).max(0), 1, atol=1e-7)
    span = joint[1].reshape(-1, 3).max(0) - joint[1].reshape(-1, 3).min(0)
    assert (span < 0.5).all()
    assert not np.allclose(joint, per, atol=1e-2)


def synthetic_scene(b=3, h=8, w=8, d=16, seed=0):
    """Central foreground block (rows/cols 2..5) vs background: two feature clusters."""
    rng = np.random.default_rng(seed)
    fg_truth = np.zeros((b, h, w), bool)
    fg_truth[:, 2:6, 2:6] = True
    fg_truth[1, 2:7, 1:5] = True  # a differently shaped object in image 1
    mu_fg, mu_bg = rng.normal(size=d) * 3, rng.normal(size=d) * 3
    x = np.where(fg_truth[..., None], mu_fg, mu_bg) + 0.3 * rng.normal(size=(b, h, w, d))
    # Two parts inside the foreground, for the second (foreground-only) PCA to find.
    x[:, :4, :, :] += np.where(fg_truth[:, :4, :, None], 1.0, 0.0) * rng.normal(size=d)
    return x.reshape(b, h * w, d), fg_truth


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("fit", ["joint", "per-image"])
def test_background_mask_recovers_known_foreground(sign, fit):
    # sign=-1 reverses every axis: the foreground side must still be found (chosen by the data
    # -- the border is background -- not by the solver's sign).
    x, truth = synthetic_scene()
    x = sign * x
    out = pca_rgb(torch.tensor(x), (8, 8), PCAConfig(fit=fit, mask_background=True))
    np.testing.assert_array_equal(out.foreground, truth)
    assert (out.rgb[~truth] == 0).all()  # background painted black
    if fit == "joint":
        # Foreground colours = a second PCA over the foreground patches only (DINOv2).
        want, _, _ = sklearn_rgb(x.reshape(-1, x.shape[-1])[truth.reshape(-1)])
        np.testing.assert_allclose(out.rgb[truth], want, atol=1e-6)
    # Without the orientation rule, the raw PC1 sign would pick the wrong side for one sign.
    raw = fit_pca(x.reshape(-1, x.shape[-1]), 1)
    score = (x.reshape(-1, x.shape[-1]) - raw.mean.numpy()) @ raw.components.numpy()[0]
    assert ((score > 0) == truth.reshape(-1)).all() != ((score < 0) == truth.reshape(-1)).all()


def test_upsample_nearest_is_block_repeat_and_bilinear_is_smooth():
    rng = np.random.default_rng(0)
    rgb = rng.random((2, 3, 4, 3)).astype(np.float32)
    up = upsample(rgb, (24, 32), "nearest")
    np.testing.assert_array_equal(up, rgb.repeat(8, axis=1).repeat(8, axis=2))
    bl = upsample(rgb, (24, 32), "bilinear")
    # Half-pixel centres: the centre of each patch block keeps the patch's colour exactly
    # only in the nearest mode; bilinear values stay within the data range.
    assert bl.min() >= rgb.min() - 1e-6 and bl.max() <= rgb.max() + 1e-6
    assert not np.allclose(bl, up)


def test_resize_center_crop():
    a = np.zeros((40, 80, 3), np.uint8)  # H=40, W=80
    a[:, 20:60] = 255  # central square of white
    out = resize_center_crop(Image.fromarray(a), 20)
    assert out.size == (20, 20)
    assert np.asarray(out)[:, 2:18].min() > 200  # the crop is the centre


# ----------------------------------------------------------------------------- CLI


def write_images(folder, n=3, size=(48, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        a = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        a[10:30, 10:30] = (200, 30 * i, 50)
        Image.fromarray(a).save(folder / f"img_{i}.png")
    return folder


def save_backbone(folder, patch=8, depth=2, variant="skipless_init", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    m = tiny_vit(variant, seed=seed, patch_size=patch, depth=depth)
    torch.save(m.state_dict(), folder / "backbone.pt")
    m.spec.to_json(folder / "backbone.json")
    return folder


TINY = [*TINY_BACKBONE_ARGS, "--resolution", "32"]


def test_cli_grid_and_determinism(tmp_path):
    imgs = write_images(tmp_path / "imgs", n=3)
    (imgs / "notes.txt").write_text("not an image")
    args = [
        "--random-init", "skip", "--random-init", "skipless_init", *TINY,
        "--images", str(imgs), "--n", "2", "--layers", "0", "1", "--dpi", "50", "--save-npz",
    ]  # fmt: skip
    info = pca_cli.main([*args, "--out", str(tmp_path / "a.png"), "--pdf"])
    assert (info.n_rows, info.n_cols) == (2, 1 + 2 * 2)
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (info.width_px, info.height_px)
    assert (tmp_path / "a.pdf").stat().st_size > 0
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["images"] == ["img_0.png", "img_1.png"]  # the first N in sorted order
    assert [(c["variant"], c["block"]) for c in meta["columns"]] == [
        ("skip", 0), ("skip", 1), ("skipless_init", 0), ("skipless_init", 1),
    ]  # fmt: skip
    npz = np.load(tmp_path / "a.npz")
    assert npz["rgb"].shape == (2, 4, 4, 4, 3)
    assert npz["images"].shape == (2, 32, 32, 3)
    # Each column was fitted jointly over both images: every channel spans [0, 1] overall.
    for c in range(4):
        flat = npz["rgb"][:, c].reshape(-1, 3)
        np.testing.assert_allclose(flat.min(0), 0, atol=1e-6)
        np.testing.assert_allclose(flat.max(0), 1, atol=1e-6)

    pca_cli.main([*args, "--out", str(tmp_path / "b.png")])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "b.npz")["rgb"], npz["rgb"])


def test_cli_checkpoints_and_synthetic_dataset(tmp_path):
    a = save_backbone(tmp_path / "run_a", variant="skip")
    b = save_backbone(tmp_path / "run_b", variant="skipless_init")
    info = pca_cli.main(
        ["--ckpt", str(a), "--ckpt", str(b), "--dataset", "synthetic", "--root",
         str(tmp_path / "cache"), "--n", "2", "--resolution", "32", "--dpi", "40",
         "--mask-background", "--fit", "per-image", "--out", str(tmp_path / "f.pdf")]
    )  # fmt: skip
    assert (info.n_rows, info.n_cols) == (2, 3)  # default layer: the last block of each
    assert info.paths == [str(tmp_path / "f.pdf")]
    meta = json.loads((tmp_path / "f.json").read_text())
    assert [c["block"] for c in meta["columns"]] == [1, 1]
    assert meta["columns"][0]["label"].startswith("run_a")


@pytest.fixture
def count_forward(monkeypatch):
    calls = []
    real = pca_figure.extract

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(pca_figure, "extract", counting)
    return calls


def test_error_empty_or_unreadable_folder(tmp_path, count_forward):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no image files at the top level"):
        pca_cli.main(["--random-init", "skip", *TINY, "--images", str(tmp_path / "empty")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit, match="none of the image files could be read"):
        pca_cli.main(["--random-init", "skip", *TINY, "--images", str(bad)])
    assert count_forward == []


def test_error_layer_out_of_range(tmp_path, count_forward):
    imgs = write_images(tmp_path / "imgs", n=1)
    with pytest.raises(SystemExit, match=r"block index 5 out of range.*valid indices are 0\.\.1"):
        pca_cli.main(["--random-init", "skip", *TINY, "--images", str(imgs), "--layers", "5"])
    assert count_forward == []


def test_error_mixed_patch_sizes_and_bad_resolution(tmp_path, count_forward):
    imgs = write_images(tmp_path / "imgs", n=1)
    a = save_backbone(tmp_path / "p8", patch=8)
    b = save_backbone(tmp_path / "p16", patch=16)
    with pytest.raises(SystemExit, match=r"share a patch size.*p8.*: 8.*p16.*: 16"):
        pca_cli.main(["--ckpt", str(a), "--ckpt", str(b), "--images", str(imgs)])
    with pytest.raises(SystemExit, match="not a multiple of the patch size 8"):
        pca_cli.main(["--ckpt", str(a), "--images", str(imgs), "--resolution", "36"])
    assert count_forward == []
