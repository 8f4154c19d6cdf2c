"""End-to-end TokenCut CLI on tiny synthetic VOC scenes, image handling and bad inputs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE_ARGS, tiny_vit
from PIL import Image
from torchvision.transforms.functional import to_tensor

from dino_skipless.data import build_detection_dataset
from dino_skipless.features import normalize_image
from tokencut import pipeline as tc_lib
from tokencut import run as tc_run
from tokencut.corloc import box_iou
from tokencut.ncut import TokenCutConfig
from tokencut.vis import GT_COLOR, PRED_COLOR, save_tokencut_vis

TINY = ["--random-init", "skipless_init", *TINY_BACKBONE_ARGS]
SYN = ["--dataset", "synthetic", "--synthetic-n", "10", "--synthetic-size", "64"]


def _count_forwards(monkeypatch):
    """Inject a tiny model whose patch embedding counts the images it sees."""
    model = tiny_vit(img_size=None)
    seen = []
    model.patch_embed.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    monkeypatch.setattr(tc_run, "backbone_from_args", lambda args: (model, model.spec, "tiny"))
    return seen


def test_cli_sweep_layers_one_forward_per_image(tmp_path, monkeypatch):
    seen = _count_forwards(monkeypatch)
    calls = []
    real_extract = tc_lib.extract

    def spy(model, images, layers, **kw):
        calls.append(list(layers))
        return real_extract(model, images, layers, **kw)

    monkeypatch.setattr(tc_lib, "extract", spy)
    out = tmp_path / "out"
    argv = [*SYN, *TINY, "--root", str(tmp_path / "cache"), "--out", str(out)]
    argv += ["--sweep-layers", "--num-workers", "0", "--quiet", "--batch-size", "4"]
    argv += ["--save-vis", str(tmp_path / "vis"), "--vis-max", "3"]
    assert tc_run.main(argv) == 0
    assert sum(seen) == 10  # every image through the backbone exactly once
    assert all(c == [0, 1] for c in calls)  # ... yielding both blocks at once
    r = json.loads((out / "results.json").read_text())
    for key in ("corloc", "layer", "feature", "n_images", "per_image", "per_layer", "best_layer"):
        assert key in r
    assert r["n_images"] == 10 and r["n_skipped"] == 0 and r["feature"] == "k"
    assert set(r["per_layer"]) == {"0", "1"}
    assert r["per_layer"][str(r["best_layer"])] == max(r["per_layer"].values())
    assert r["layer"] == r["best_layer"]
    # The reported numbers follow from the per-image boxes (IoU >= 0.5 with any GT box).
    hits = []
    for e in r["per_image"]:
        iou = box_iou(e["pred_box"], np.array(e["gt_boxes"])).max()
        assert iou == pytest.approx(e["best_iou"])
        hits.append(iou >= 0.5)
        assert e["best_iou_per_layer"][str(r["layer"])] == e["best_iou"]
    assert r["corloc"] == pytest.approx(100 * np.mean(hits))
    assert (out / "results.md").read_text().count("(best)") == 1
    assert len(list((tmp_path / "vis").glob("*.png"))) == 3


def test_cli_single_layer_and_no_hard(tmp_path, monkeypatch):
    seen = _count_forwards(monkeypatch)
    out = tmp_path / "out"
    argv = [*SYN, *TINY, "--root", str(tmp_path / "cache"), "--out", str(out), "--quiet"]
    argv += ["--layer", "0", "--no-hard", "--num-workers", "0", "--feature", "tokens"]
    assert tc_run.main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["layer"] == 0 and r["feature"] == "tokens" and list(r["per_layer"]) == ["0"]
    # Synthetic scene 1 has only hard boxes; no-hard drops it and counts it.
    assert r["skipped"]["no_hard_dropped"] >= 1
    assert r["n_images"] + r["n_skipped"] == 10 == sum(seen) + r["n_skipped"]

    ds = build_detection_dataset("voc12", Path(r["root"]))
    nonhard = {ds.target(i)["image_id"]: (~ds.target(i)["hard"]).sum() for i in range(len(ds))}
    assert r["skipped"]["no_hard_dropped"] == sum(v == 0 for v in nonhard.values())
    for e in r["per_image"]:
        assert len(e["gt_boxes"]) == nonhard[e["image"]]


@dataclass
class _Rec:
    size: tuple[int, int]


@dataclass
class _FakeDetection:
    """Stand-in reader with tiny and box-less images (the real data layer has no such scene)."""

    images: list[Image.Image]
    boxes: list[np.ndarray]
    records: list[_Rec] = field(init=False)

    def __post_init__(self):
        self.records = [_Rec(im.size) for im in self.images]

    def __len__(self):
        return len(self.images)

    def target(self, i):
        b = self.boxes[i]
        return {"boxes": b, "hard": np.zeros(len(b), bool), "image_id": f"im{i}"}

    def load(self, i):
        return self.images[i]


def test_small_boxless_and_degenerate_images_are_counted(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)

    def img(h, w):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    gt = np.array([[2.0, 3.0, 30.0, 20.0]])
    flat = Image.new("RGB", (40, 32), (120, 60, 200))  # constant image
    ds = _FakeDetection(
        [img(40, 48), img(6, 40), img(40, 8), img(32, 32), flat, img(33, 41)],
        [gt, gt, gt, np.zeros((0, 4)), gt, gt],
    )
    monkeypatch.setattr(tc_run, "load_dataset", lambda *a: (ds, Path("fake")))
    _count_forwards(monkeypatch)
    # A constant image still has distinct tokens (position embeddings), so the degenerate graph
    # is forced: the 32x40 image's features are replaced by identical vectors.
    out = tmp_path / "out"
    argv = ["--dataset", "voc07", *TINY, "--out", str(out), "--quiet", "--num-workers", "0"]
    argv += ["--batch-size", "2"]
    real_batch = tc_lib.tokencut_batch

    def degenerate_for_flat(feats, grid, patch, sizes, cfg):
        feats = feats.clone()
        for j, hw in enumerate(sizes):
            if hw == (32, 40):
                feats[j] = 1.0
        return real_batch(feats, grid, patch, sizes, cfg)

    monkeypatch.setattr(tc_lib, "tokencut_batch", degenerate_for_flat)
    assert tc_run.main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["skipped"] == {"too_small": 2, "no_gt": 1, "no_hard_dropped": 0}
    assert r["n_images"] == 3 and r["n_skipped"] == 3
    assert r["n_degenerate"] == 1
    flat_entry = next(e for e in r["per_image"] if e["image"] == "im4")
    assert flat_entry["degenerate"] and flat_entry["pred_box"] == [0.0, 0.0, 40.0, 32.0]
    assert {s["image"] for s in r["skipped_images"]} == {"im1", "im2", "im3"}


def test_images_are_padded_with_zeros_after_normalisation():
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (13, 21, 3), dtype=np.uint8))
    ds = _FakeDetection([im], [np.array([[0.0, 0, 5, 5]])])
    plan = tc_lib.plan_images(ds, patch=8, no_hard=False)
    x, k = tc_lib._Images(ds, plan.items, 8)[0]
    assert x.shape == (3, 16, 24) and k == 0
    torch.testing.assert_close(x[:, :13, :21], normalize_image(to_tensor(im)[None])[0])
    assert (x[:, 13:] == 0).all() and (x[:, :, 21:] == 0).all()


def test_bucketing_batches_only_equal_padded_sizes_and_matches_batch_of_one():
    sizes = [(40, 48), (37, 44), (40, 40), (33, 48), (48, 40), (39, 41)]
    items = [tc_lib.Item(i, f"im{i}", hw, np.zeros((1, 4))) for i, hw in enumerate(sizes)]
    batches = tc_lib.bucket_batches(items, 8, batch_size=8)
    assert sorted(k for b in batches for k in b) == list(range(6))
    for b in batches:
        assert len({tc_lib.padded_hw(items[k].hw, 8) for k in b}) == 1
    assert len(batches) == 3  # padded 40x48 (4 images), 40x40, 48x40

    rng = np.random.default_rng(2)
    imgs = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    ds = _FakeDetection(imgs, [np.array([[0.0, 0, 20, 20]])] * 6)
    plan = tc_lib.plan_images(ds, 8, False)
    model = tiny_vit(img_size=None)
    cfg = TokenCutConfig()
    dev = torch.device("cpu")
    kw = dict(progress=False)
    big = tc_lib.run_tokencut(model, ds, plan.items, [1], cfg, dev, batch_size=8, **kw)[1]
    one = tc_lib.run_tokencut(model, ds, plan.items, [1], cfg, dev, batch_size=1, **kw)[1]
    assert [p.box for p in big] == [p.box for p in one]


def test_vis_draws_boxes_and_mask(tmp_path):
    im = Image.new("RGB", (64, 48), (0, 0, 0))
    mask = np.zeros((6, 8), bool)
    mask[1, 1] = True
    p = save_tokencut_vis(tmp_path / "v.png", im, [8, 8, 40, 32], [[0, 24, 64, 48]], mask, 8)
    a = np.asarray(Image.open(p))
    assert tuple(a[8, 20]) == PRED_COLOR  # top edge of the predicted box
    assert tuple(a[47, 30]) == GT_COLOR  # bottom edge of the GT box
    assert a[12, 12, 2] > 0 and a[12, 12, 0] == 0  # tinted mask patch (blue)
    assert tuple(a[2, 60]) == (0, 0, 0)  # untouched


def test_degenerate_graphs_reported_per_block(tmp_path, monkeypatch):
    """Issue 18: the summary said "degenerate graphs: 0" (the reported block's count) while
    another block was degenerate on every image."""
    _count_forwards(monkeypatch)
    real_batch = tc_lib.tokencut_batch
    calls = {"n": 0}

    def block1_degenerate(feats, grid, patch, sizes, cfg):
        # run_tokencut calls this once per block (0, 1, 0, 1, ...) for each image batch
        block = calls["n"] % 2
        calls["n"] += 1
        return real_batch(torch.ones_like(feats) if block == 1 else feats, grid, patch, sizes, cfg)

    monkeypatch.setattr(tc_lib, "tokencut_batch", block1_degenerate)
    out = tmp_path / "out"
    argv = [*SYN, *TINY, "--root", str(tmp_path / "cache"), "--out", str(out), "--quiet"]
    argv += ["--sweep-layers", "--num-workers", "0", "--batch-size", "4"]
    assert tc_run.main(argv) == 0
    r = json.loads((out / "results.json").read_text())
    n = r["n_images"]
    assert r["n_degenerate_per_layer"] == {"0": 0, "1": n}
    rows = [line for line in (out / "results.md").read_text().splitlines() if "| synthetic" in line]
    assert [row.rstrip(" |").split("|")[-1].strip() for row in rows] == ["0", str(n)]
    assert "degenerate" in (out / "results.md").read_text().splitlines()[0]
    assert len(r["run_id"]) == 16
