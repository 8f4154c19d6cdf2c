import importlib.util
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BACKBONE_ARGS, tiny_vit
from sklearn.metrics import confusion_matrix as sk_confusion

import eval.linprobe_lib as lp
from dino_skipless.cli import default_num_workers
from dino_skipless.data import synthetic_root
from dino_skipless.features import extract
from eval.feature_cache import ResizedSegmentation, build_cache
from eval.linprobe import build_parser, config_from_args, main
from eval.linprobe_lib import build_datasets, probe_backbone, validate
from eval.metrics import (
    bootstrap_miou,
    iou_from_counts,
    mean_iou,
    per_image_confusion,
    tp_fp_fn,
)
from eval.probe_lib import (
    CPU_LOGIT_CAP,
    GPU_LOGIT_CAP,
    LinProbeConfig,
    ProbeDivergedError,
    ProbeWeights,
    _step_chunks,
    evaluate_probes,
    flush_denormals,
    logit_cap,
    probe_loss_and_grads,
    summarise,
    train_probes,
    upsample_matrix,
)

TINY = dict(resolution=64, epochs=3, batch_size=4, num_workers=0, extract_batch_size=4)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):

    return synthetic_root("voc", n=12, size=64, seed=0, cache_dir=tmp_path_factory.mktemp("syn"))


def random_problem(n=6, d=8, c=3, h=4, up=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, h, h, generator=g)
    masks = torch.randint(0, c, (n, h * up, h * up), generator=g)
    masks[torch.rand(masks.shape, generator=g) < 0.1] = 255
    return feats, masks.to(torch.uint8)


# ---------------------------------------------------------------------------- probe training


def test_oracle_features_reach_full_miou():
    # Features one-hot-encode each patch's class; classes are constant over 2x2-patch blocks
    # and labels are 4x finer than the grid, so upsampled logits must get (nearly) every pixel.
    g = torch.Generator().manual_seed(0)
    c, h, p = 4, 6, 4
    cls = torch.randint(0, c, (12, h // 2, h // 2), generator=g)
    cls = cls.repeat_interleave(2, 1).repeat_interleave(2, 2)
    feats = F.one_hot(cls, c).permute(0, 3, 1, 2).float()
    masks = cls.repeat_interleave(p, 1).repeat_interleave(p, 2).to(torch.uint8)
    cfg = LinProbeConfig(epochs=10, batch_size=4, lrs=(0.01, 1.0))
    probes = train_probes(lambda i: feats[i], masks, c, c, cfg.lrs, cfg, progress=False)
    up = evaluate_probes(probes, lambda i: feats[i], list(masks), c, progress=False)
    assert mean_iou(up[1]) * 100 > 97
    # The tiny lr gets the blocks but not the boundaries in 30 steps: the sweep matters.
    assert mean_iou(up[0]) < mean_iou(up[1]) - 0.05
    # At the label resolution of the grid itself there is no interpolation: exactly 100.
    conf = evaluate_probes(probes, lambda i: feats[i], list(cls.to(torch.uint8)), c, progress=False)
    assert mean_iou(conf[1]) == 1.0


def test_all_lrs_together_equal_each_alone():
    feats, masks = random_problem()
    lrs = (0.01, 0.1, 1.0)
    cfg = LinProbeConfig(epochs=3, batch_size=4, lrs=lrs)
    together = train_probes(lambda i: feats[i], masks, 3, 8, lrs, cfg, progress=False)
    for k, lr in enumerate(lrs):
        alone = train_probes(lambda i: feats[i], masks, 3, 8, [lr], cfg, progress=False)
        torch.testing.assert_close(together.weight[k], alone.weight[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together.bias[k], alone.bias[0], rtol=1e-5, atol=1e-6)
    # ... and the lrs really differ
    assert not torch.allclose(together.weight[0], together.weight[2])


def test_lr_chunking_does_not_change_the_result():
    feats, masks = random_problem(seed=3)
    lrs = (0.01, 0.1, 1.0)
    cfg = LinProbeConfig(epochs=2, batch_size=4, lrs=lrs)
    full = train_probes(lambda i: feats[i], masks, 3, 8, lrs, cfg, progress=False)
    per = 3 * masks.shape[-2] * masks.shape[-1]  # logits of one image for one lr
    for cap in (1, 4 * per * 2, 2 * per):  # 1 image x 1 lr; 4 images x 2 lrs; 2 images x 1 lr
        chunked = train_probes(
            lambda i: feats[i], masks, 3, 8, lrs, replace(cfg, max_logit_elems=cap), progress=False
        )
        torch.testing.assert_close(full.weight, chunked.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(full.bias, chunked.bias, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(full.losses, chunked.losses, rtol=1e-6)


@pytest.mark.parametrize(
    "bsz,n_l,per,cap",
    [
        (16, 7, 100, 10**9),
        (16, 7, 100, 3200),
        (16, 7, 100, 1000),
        (5, 3, 100, 1),
        (16, 7, 100, 1599),
    ],
)
def test_step_chunks_cover_each_image_and_lr_once_within_the_cap(bsz, n_l, per, cap):
    chunks = _step_chunks(bsz, n_l, per, cap)
    seen = np.zeros((bsz, n_l), dtype=int)
    for im, sl in chunks:
        seen[im, sl] += 1
        size = (im.stop - im.start) * (sl.stop - sl.start) * per
        assert size <= max(cap, per)  # one image of one lr is the smallest chunk there is
    assert (seen == 1).all()
    if bsz * n_l * per <= cap:
        assert len(chunks) == 1


@pytest.mark.parametrize(
    ("h", "w", "big_h", "big_w"), [(4, 4, 32, 32), (5, 7, 19, 23), (6, 3, 6, 9)]
)
def test_upsample_matrices_are_f_interpolate(h, w, big_h, big_w):
    x = torch.randn(3, 2, h, w, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(x, size=(big_h, big_w), mode="bilinear", align_corners=False)
    ours = upsample_matrix(h, big_h) @ x @ upsample_matrix(w, big_w).T
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_hand_written_probe_gradients_match_autograd():
    # Reference: autograd through F.interpolate and F.cross_entropy (ignore_index), per lr.
    g = torch.Generator().manual_seed(3)
    bsz, d, c, n_l, (h, w), (big_h, big_w) = 3, 6, 4, 2, (5, 7), (19, 23)
    x = torch.randn(bsz, d, h, w, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (bsz, big_h, big_w), generator=g)
    y[torch.rand(y.shape, generator=g) < 0.2] = 255
    weight = torch.randn(n_l, c, d, generator=g, dtype=torch.float64)
    bias = torch.randn(n_l, c, generator=g, dtype=torch.float64)
    n_valid = int((y != 255).sum())
    a_h = upsample_matrix(h, big_h, dtype=torch.float64)
    a_w = upsample_matrix(w, big_w, dtype=torch.float64)
    loss, g_w, g_b = probe_loss_and_grads(x, y, weight, bias, a_h, a_w, n_valid)
    for k in range(n_l):
        wk = weight[k].clone().requires_grad_(True)
        bk = bias[k].clone().requires_grad_(True)
        logits = torch.einsum("bdhw,cd->bchw", x, wk) + bk[None, :, None, None]
        up = F.interpolate(logits, size=(big_h, big_w), mode="bilinear", align_corners=False)
        ref = F.cross_entropy(up, y, ignore_index=255, reduction="sum") / n_valid
        ref.backward()
        torch.testing.assert_close(loss[k], ref.detach())
        torch.testing.assert_close(g_w[k], wk.grad)
        torch.testing.assert_close(g_b[k], bk.grad)


def test_logit_cap_defaults_by_device():
    assert logit_cap(None, "cpu") == CPU_LOGIT_CAP == 2**20
    assert logit_cap(None, "cuda") == GPU_LOGIT_CAP == 2**28
    assert logit_cap(12345, "cpu") == 12345


def test_training_matches_torch_sgd_conv_reference():
    # Independent reference: nn.Conv2d 1x1 + torch.optim.SGD + per-step cosine + upsampled CE.
    feats, masks = random_problem(seed=1)
    lr, c, d = 0.3, 3, 8
    cfg = LinProbeConfig(epochs=2, batch_size=4, lrs=(lr,), seed=5)
    ours = train_probes(lambda i: feats[i], masks, c, d, [lr], cfg, progress=False)

    gen = torch.Generator().manual_seed(cfg.seed)
    conv = torch.nn.Conv2d(d, c, 1)
    with torch.no_grad():
        conv.weight.copy_((torch.randn(c, d, generator=gen) * cfg.init_std).view(c, d, 1, 1))
        conv.bias.zero_()
    opt = torch.optim.SGD(conv.parameters(), lr=lr, momentum=0.9, weight_decay=0)
    n = len(masks)
    steps = cfg.epochs * int(np.ceil(n / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps)))
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            y = masks[idx].long()
            logits = F.interpolate(conv(feats[idx]), size=y.shape[-2:], mode="bilinear")
            loss = F.cross_entropy(logits, y, ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.testing.assert_close(ours.weight[0], conv.weight.view(c, d), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bias[0], conv.bias, rtol=1e-4, atol=1e-5)


def test_evaluation_upsamples_to_each_label_resolution():
    g = torch.Generator().manual_seed(2)
    c, d = 4, 5
    feats = torch.randn(5, d, 3, 3, generator=g)
    masks = [
        torch.randint(0, c, s, generator=g).to(torch.uint8)
        for s in [(7, 9), (12, 12), (7, 9), (5, 16), (12, 12)]
    ]
    probes = ProbeWeights(torch.randn(2, c, d, generator=g), torch.randn(2, c, generator=g), [0, 1])
    conf = evaluate_probes(probes, lambda i: feats[i], masks, c, batch_size=2, progress=False)
    for k in range(2):
        ref = np.zeros((c, c), dtype=np.int64)
        for i, m in enumerate(masks):
            lg = F.conv2d(feats[i : i + 1], probes.weight[k].view(c, d, 1, 1), probes.bias[k])
            pred = F.interpolate(lg, size=m.shape, mode="bilinear").argmax(1)[0]
            ref += sk_confusion(m.flatten(), pred.flatten(), labels=list(range(c)))
        np.testing.assert_array_equal(conf[k].numpy(), ref)


# ---------------------------------------------------------------------------- cache / pipeline


class CountingExtract:
    def __init__(self):
        self.calls, self.images, self.layers = 0, 0, []

    def __call__(self, model, images, layers, **kw):
        self.calls += 1
        self.images += images.shape[0]
        self.layers.append(sorted(layers))
        return extract(model, images, layers, **kw)


def test_single_and_multiscale_share_one_backbone_pass(synth_root, tmp_path):
    cfg = replace(LinProbeConfig(**TINY), lrs=(0.1, 1.0), layers=(1,), ms_layers=(0, 1))
    train_ds, val_ds, _, _ = build_datasets("voc", synth_root, cfg)
    model = tiny_vit(img_size=None)
    counter = CountingExtract()
    run = probe_backbone(
        model, train_ds, val_ds, cfg, ("single", "multiscale"), extractor=counter, progress=False
    )
    n = len(train_ds) + len(val_ds)
    assert counter.images == n  # exactly one pass per image for both probes
    assert run["backbone_passes"] == {"train": len(train_ds), "val": len(val_ds)}
    assert all(ls == [0, 1] for ls in counter.layers)  # union of both probes' blocks
    assert run["results"]["single"]["layers"] == [1]
    assert run["results"]["multiscale"]["layers"] == [0, 1]

    # The cache holds exactly what extract() returns for block 1 (final norm, fp16).
    cache = build_cache(model, val_ds, [1], cfg.resolution, train=False, progress=False)

    x, _ = ResizedSegmentation(val_ds, cfg.resolution, False)[0]
    ref = extract(model, x[None], [1], norm=True).patch_grid(1)[0]
    torch.testing.assert_close(cache.feats[1][0].float(), ref, rtol=2e-3, atol=2e-3)
    assert tuple(cache.masks[0].shape) == np.asarray(val_ds[0][1]).shape  # label resolution

    # A disk cache is reused: no backbone pass the second time, same numbers.
    counter2 = CountingExtract()
    key = {"ckpt": "tiny"}
    a = probe_backbone(
        model,
        train_ds,
        val_ds,
        cfg,
        ("single",),
        cache_dir=tmp_path,
        key_parts=key,
        extractor=counter2,
        progress=False,
    )
    b = probe_backbone(
        model,
        train_ds,
        val_ds,
        cfg,
        ("single",),
        cache_dir=tmp_path,
        key_parts=key,
        extractor=counter2,
        progress=False,
    )
    assert counter2.images == n and b["backbone_passes"] == {"train": 0, "val": 0}
    assert a["results"]["single"]["per_lr"] == b["results"]["single"]["per_lr"]


def test_bad_layer_and_resolution_fail_fast_with_valid_range(tmp_path):
    model = tiny_vit(img_size=None)
    with pytest.raises(ValueError, match=r"valid indices are 0\.\.1"):
        validate(model, LinProbeConfig(layers=(2,), resolution=64), ("single",))
    with pytest.raises(ValueError, match=r"valid indices are 0\.\.1"):
        validate(model, LinProbeConfig(ms_layers=(0, 5), resolution=64), ("multiscale",))
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        validate(model, LinProbeConfig(resolution=60), ("single",))
    # CLI: the backbone check comes before the dataset is touched (the root does not exist).
    base = [
        "--dataset",
        "voc",
        "--root",
        str(tmp_path / "missing"),
        "--random-init",
        "skipless_init",
        *TINY_BACKBONE_ARGS,
    ]
    with pytest.raises(SystemExit, match=r"valid indices are 0\.\.1"):
        main(base + ["--layers", "7", "--resolution", "64"])
    with pytest.raises(SystemExit, match="multiple of the patch size 8"):
        main(base + ["--resolution", "63"])


def test_cli_end_to_end_writes_documented_results(synth_root, tmp_path):
    out = tmp_path / "lp"
    argv = [
        "--dataset", "synthetic", "--root", str(synth_root.parent), "--synthetic-n", "12",
        "--synthetic-size", "64", "--random-init", "skipless_init", *TINY_BACKBONE_ARGS,
        "--resolution", "64", "--epochs", "3",
        "--lrs", "0.01", "0.1", "1.0", "--mode", "both", "--num-workers", "0",
        "--batch-size", "4", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    for key in (
        "miou",
        "best_lr",
        "layers",
        "per_lr",
        "per_class_iou",
        "pacc",
        "config",
        "checkpoint",
        "command",
        "timings",
        "multiscale",
        "backbone",
    ):
        assert key in res, key
    assert res["layers"] == [1] and res["multiscale"]["layers"] == [0, 1]
    assert set(res["per_lr"]) == {"0.01", "0.1", "1.0"}
    assert res["miou"] == max(res["per_lr"].values())
    assert res["per_lr"][repr(res["best_lr"])] == res["miou"]
    assert len(res["per_class_iou"]) == 21 and 0 <= res["pacc"] <= 100
    assert res["backbone_passes"] == {"train": res["n_train"], "val": res["n_val"]}
    assert "| synthetic |" in (out / "results.md").read_text()


def test_sweep_ckpts_one_table(synth_root, tmp_path):
    model = tiny_vit(seed=3, img_size=None)
    ck = tmp_path / "run_a"
    ck.mkdir()
    torch.save(model.state_dict(), ck / "backbone.pt")
    model.spec.to_json(ck / "backbone.json")
    out = tmp_path / "sweep"
    argv = [
        "--dataset", "voc", "--root", str(synth_root), "--sweep-ckpts", str(ck / "backbone.pt"),
        "random:skip", *TINY_BACKBONE_ARGS,
        "--resolution", "64", "--epochs", "2", "--lrs", "0.1", "--num-workers", "0",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["ckpt"] for r in sweep["rows"]] == ["run_a (skipless_init)", "random-skip"]
    assert (out / "run_a_skipless_init" / "results.json").is_file()
    assert (out / "random-skip" / "results.json").is_file()
    assert "random-skip" in (out / "sweep.md").read_text()


def test_sweep_script_pivots_results_into_one_table(tmp_path):

    path = Path(__file__).resolve().parents[1] / "scripts" / "sweep_linprobe.py"
    spec = importlib.util.spec_from_file_location("sweep_linprobe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for i, (ds, label, m) in enumerate(
        [("voc", "a", 50.0), ("ade20k", "a", 20.0), ("voc", "b", 40.0)]
    ):
        res = {
            "dataset": ds,
            "label": label,
            "probe": "single",
            "miou": m,
            "layers": [11],
            "multiscale": {"miou": m + 1, "layers": [8, 9, 10, 11]},
        }
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(res))
    headers, rows = mod.pivot(mod.collect([tmp_path]))
    assert headers == ["ckpt", "voc single", "voc multiscale", "ade20k single", "ade20k multiscale"]
    assert rows == [["a", 50.0, 51.0, 20.0, 21.0], ["b", 40.0, 41.0, "-", "-"]]


# ------------------------------------------------------------------------- bootstrap error bars


def test_per_image_counts_pool_to_the_whole_set_confusion():
    feats, masks = random_problem(n=7, c=3)
    cfg = LinProbeConfig(epochs=1, batch_size=3, lrs=(0.1, 1.0))
    probes = train_probes(lambda i: feats[i], masks, 3, 8, cfg.lrs, cfg, progress=False)
    conf = evaluate_probes(probes, lambda i: feats[i], list(masks), 3, progress=False)
    conf2, counts = evaluate_probes(
        probes, lambda i: feats[i], list(masks), 3, batch_size=2, progress=False, per_image=True
    )
    assert torch.equal(conf, conf2) and counts.shape == (2, 7, 3, 3)
    assert torch.equal(counts.sum(1), tp_fp_fn(conf))
    # image 0 by hand, from an independent sklearn confusion of its own prediction
    x = probes_predict(probes, feats[:1], masks.shape[-2:])
    m = masks[0].reshape(-1).numpy()
    keep = m != 255
    for li in range(2):
        sk = sk_confusion(m[keep], x[li].reshape(-1).numpy()[keep], labels=[0, 1, 2])
        tp = np.diag(sk)
        ref = np.stack([tp, sk.sum(0) - tp, sk.sum(1) - tp], axis=-1)
        np.testing.assert_array_equal(counts[li, 0].numpy(), ref)


def probes_predict(probes, x, size):
    """Reference prediction of one image batch: 1x1 conv, bilinear upsampling, argmax."""
    logits = torch.einsum("bdhw,lcd->lbchw", x, probes.weight) + probes.bias[:, None, :, None, None]
    n_l, b, c = logits.shape[:3]
    up = F.interpolate(logits.flatten(0, 1), size=tuple(size), mode="bilinear", align_corners=False)
    return up.view(n_l, b, c, *size).argmax(2)[:, 0]


def test_bootstrap_matches_explicit_resampling_and_degenerate_cases():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=(40, 4, 3))
    counts[:, 3] = 0  # a class absent everywhere: excluded like in mean_iou
    pooled = counts.sum(0)
    conf_iou = iou_from_counts(pooled)
    assert np.isnan(conf_iou[3])
    # reference: explicit index resampling, pooled counts, nanmean IoU
    ref = []
    for _ in range(3000):
        idx = rng.integers(0, 40, 40)
        ref.append(np.nanmean(iou_from_counts(counts[idx].sum(0))) * 100)
    bs = bootstrap_miou(counts, n_boot=3000, seed=1)
    assert bs["se"] == pytest.approx(np.std(ref, ddof=1), rel=0.1)
    assert bs["lo"] < np.nanmean(conf_iou) * 100 < bs["hi"]
    # identical images: every resample pools to the same counts, so no spread
    same = np.repeat(counts[:1], 10, axis=0)
    bs = bootstrap_miou(same, n_boot=50)
    assert bs["se"] == pytest.approx(0.0, abs=1e-9) and bs["lo"] == pytest.approx(bs["hi"])
    assert bootstrap_miou(counts[:0], n_boot=10)["n_boot"] == 0


def test_summarise_reports_the_best_lr_error_bar():
    feats, masks = random_problem(n=8, c=3)
    cfg = LinProbeConfig(epochs=2, batch_size=4, lrs=(0.01, 1.0))
    probes = train_probes(lambda i: feats[i], masks, 3, 8, cfg.lrs, cfg, progress=False)
    conf, counts = evaluate_probes(
        probes, lambda i: feats[i], list(masks), 3, progress=False, per_image=True
    )
    out = summarise(conf, cfg.lrs, ["a", "b", "c"], counts=counts, n_boot=200, seed=0)
    best = cfg.lrs.index(out["best_lr"])
    ref = bootstrap_miou(counts[best], 200, 0)
    assert out["miou_se"] == ref["se"] > 0 and out["miou_ci95"] == [ref["lo"], ref["hi"]]
    assert "miou_se" not in summarise(conf, cfg.lrs, ["a", "b", "c"])


def test_per_image_confusion_equals_one_confusion_per_image():
    g = torch.Generator().manual_seed(3)
    pred = torch.randint(0, 4, (2, 5, 6, 7), generator=g)
    target = torch.randint(0, 4, (5, 6, 7), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    got = per_image_confusion(pred, target, 4)
    for li in range(2):
        for b in range(5):
            keep = (target[b] != 255).reshape(-1).numpy()
            ref = sk_confusion(
                target[b].reshape(-1).numpy()[keep], pred[li, b].reshape(-1).numpy()[keep],
                labels=[0, 1, 2, 3],
            )  # fmt: skip
            np.testing.assert_array_equal(got[li, b].numpy(), ref)


def test_mode_both_keeps_the_single_probe_when_multiscale_is_interrupted(
    synth_root, tmp_path, monkeypatch
):

    real, calls = lp.probe_from_cache, []

    def interrupted_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the multiscale probe: the user presses Ctrl-C
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(lp, "probe_from_cache", interrupted_second)
    out = tmp_path / "lp"
    argv = [
        "--dataset", "synthetic", "--root", str(synth_root.parent), "--synthetic-n", "12",
        "--synthetic-size", "64", "--random-init", "skipless_init", *TINY_BACKBONE_ARGS,
        "--resolution", "32", "--epochs", "1",
        "--lrs", "0.1", "--mode", "both", "--num-workers", "0", "--bootstrap", "10",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    res = json.loads((out / "results.json").read_text())
    assert res["probe"] == "single" and res["pending"] == ["multiscale"]
    assert "multiscale" not in res and 0 <= res["miou"] <= 100 and res["layers"] == [1]
    with np.load(out / "per_image_counts.npz") as z:
        assert str(z["run_id"]) == res["run_id"] and "multiscale" not in z.files
        # the saved counts pool back to the reported mIoU
        assert np.nanmean(iou_from_counts(z["single"].sum(0))) * 100 == pytest.approx(res["miou"])


def test_synthetic_on_cpu_defaults_to_the_scene_side(synth_root, tmp_path, capsys):
    out = tmp_path / "lp"
    argv = [
        "--dataset", "synthetic", "--root", str(synth_root.parent), "--synthetic-n", "12",
        "--synthetic-size", "60", "--random-init", "skipless_init", *TINY_BACKBONE_ARGS,
        "--epochs", "1", "--lrs", "0.1", "--device", "cpu",
        "--num-workers", "0", "--bootstrap", "0", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["config"]["resolution"] == 64  # 60 -> 8k
    assert "--resolution 64" in capsys.readouterr().err
    # real datasets keep the published 448

    args = build_parser().parse_args(["--dataset", "voc", "--random-init", "skip"])
    assert config_from_args(args)[0].resolution == 448 == LinProbeConfig().resolution


def test_default_workers_capped_at_the_cpu_count(monkeypatch):

    for cpus, want in ((1, 1), (2, 2), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert default_num_workers() == want
        assert LinProbeConfig().num_workers == want


def test_flush_denormals_zeroes_subnormals_inside_only():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    torch.set_flush_denormal(False)
    tiny = torch.tensor([1e-39])  # subnormal in float32 (the smallest normal is 1.2e-38)
    assert (tiny * 1.5).item() > 0
    with flush_denormals("cpu"):
        assert (tiny * 1.5).item() == 0.0
        assert (torch.tensor([2e-38]) * 1.5).item() == pytest.approx(3e-38)  # normals untouched
    assert (tiny * 1.5).item() == pytest.approx(1.5e-39, rel=1e-3)  # the default is back
    with flush_denormals("meta"):  # not a CPU: nothing changes
        assert (tiny * 1.5).item() > 0


# ------------------------------------------------------------------- diverged lrs (issue 33)


def test_a_diverged_lr_never_wins_the_sweep():
    """Issue 33, point 6: lr 1e38 blew up (loss ~1e37) yet scored the best mIoU of the sweep
    and was reported as best_lr; a diverged lr is now listed and never chosen."""
    feats, masks = random_problem(n=8, c=3)
    cfg = LinProbeConfig(epochs=2, batch_size=4, lrs=(0.001, 0.01, 1e38))
    probes = train_probes(lambda i: feats[i], masks, 3, 8, cfg.lrs, cfg, progress=False)
    assert probes.diverged == [False, False, True]
    assert probes.losses[-1][2] > 1e30  # finite, but far above ln(3)
    conf = evaluate_probes(probes, lambda i: feats[i], list(masks), 3, progress=False)
    out = summarise(conf, cfg.lrs, ["a", "b", "c"], probes.diverged)
    assert out["per_lr"]["1e+38"] > max(out["per_lr"]["0.001"], out["per_lr"]["0.01"])
    assert out["best_lr"] == 0.01 and out["miou"] == out["per_lr"]["0.01"]
    assert out["diverged_lrs"] == [1e38]


def test_nan_probes_are_diverged_and_all_diverged_is_an_error():
    w = torch.zeros(3, 2, 4)
    w[1, 0, 0] = float("nan")
    probes = ProbeWeights(w, torch.zeros(3, 2), [0.1, 1.0, 10.0], losses=[[0.5, 0.6, float("inf")]])
    assert probes.diverged == [False, True, True]
    conf = torch.zeros(3, 2, 2, dtype=torch.long)
    conf[:, 0, 0], conf[:, 1, 1] = 5, 5  # every lr scores 100 %
    out = summarise(conf, [0.1, 1.0, 10.0], ["a", "b"], probes.diverged)
    assert out["best_lr"] == 0.1 and out["diverged_lrs"] == [1.0, 10.0]
    with pytest.raises(ProbeDivergedError, match="every learning rate"):
        summarise(conf, [0.1, 1.0, 10.0], ["a", "b"], [True, True, True])
