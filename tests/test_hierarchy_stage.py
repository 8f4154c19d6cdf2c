"""The hierarchy stage (dino_skipless/hierarchy_eval.py, python -m dino_skipless.hierarchy): the
streamed minibatches, one forward per image, agreement with eval.knn / eval.linprobe at the
last block, the files and the CLI."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE_ARGS, tiny_vit

from dino_skipless import hierarchy
from dino_skipless.data import ImageFolderDataset, build_segmentation_dataset, synthetic_root
from dino_skipless.features import Features, extract
from dino_skipless.fileio import atomic_write_with, write_npz
from dino_skipless.hierarchy_eval import (
    CKAStream,
    HierarchyConfig,
    block_cls_features,
    claims_for,
    evaluate_model,
    load_results,
    stream_extractor,
)
from dino_skipless.hierarchy_lib import (
    batch_hsic,
    hierarchy_claim,
    minibatch_cka,
    summarise,
)
from eval.knn_lib import KNNConfig, eval_transform, extract_cls, run_knn
from eval.linprobe_lib import probe_backbone
from eval.probe_lib import LinProbeConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cache = tmp_path_factory.mktemp("syn")
    seg = synthetic_root("voc", n=48, size=32, seed=0, cache_dir=cache)
    knn = synthetic_root("imagefolder", n=24, size=32, seed=1, cache_dir=cache)
    return cache, seg, knn


def cfg(**kw):
    return HierarchyConfig(**{"resolution": 32, "batch_images": 4, "bootstrap": 50,
                              "num_workers": 0, **kw})  # fmt: skip


def test_extract_keeps_the_tokens_entering_the_first_block():
    model = tiny_vit("skip")
    x = torch.randn(2, 3, 32, 32)
    f = extract(model, x, [0, 1], with_embedding=True)
    with torch.no_grad():
        assert torch.allclose(model.blocks[0](f.embedding), f.tokens[0], atol=1e-6)
    assert extract(model, x, [1]).embedding is None


def test_stream_regroups_forward_batches_into_minibatches():
    model = tiny_vit("skipless_init")
    x = torch.randn(10, 3, 32, 32)
    stream = CKAStream(cfg(patch_tokens=1000))  # >= 16 positions: every patch token
    for i in range(0, 10, 3):  # forward batches of 3, minibatches of 4
        stream.add(extract(model, x[i : i + 3], [0, 1], with_embedding=True))
    h = stream.result()
    assert h["patch"].shape == (2, 3, 3) and h["cls"].shape == (2, 2, 2)
    assert (stream.used, stream.seen) == (8, 10)
    f = extract(model, x, [0, 1], with_embedding=True)
    for b in range(2):
        sl = slice(4 * b, 4 * b + 4)
        patch = torch.stack([f.embedding[sl, 1:], f.tokens[0][sl, 1:], f.tokens[1][sl, 1:]])
        # the stream's examples are the same tokens in another order: the same HSIC
        ref = batch_hsic(patch.flatten(1, 2)).numpy()
        np.testing.assert_allclose(h["patch"][b], ref, rtol=1e-6)
        cls = torch.stack([f.tokens[0][sl, 0], f.tokens[1][sl, 0]])
        np.testing.assert_allclose(h["cls"][b], batch_hsic(cls).numpy(), rtol=1e-6)
    capped = CKAStream(cfg(max_images=5))
    capped.add(extract(model, x, [0, 1], with_embedding=True))
    assert capped.result()["patch"].shape[0] == 1 and (capped.used, capped.seen) == (4, 10)
    with pytest.raises(ValueError, match="at least one minibatch of 4 images"):
        CKAStream(cfg()).result()


def test_sampled_positions_are_shared_by_every_depth():
    # the same tokens at two depths must give CKA 1: the sampled positions are the same
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 17, 6, generator=g)
    f = Features({0: t.clone(), 1: 2 * t.clone()}, (4, 4), 1, embedding=t.clone())
    stream = CKAStream(cfg(patch_tokens=3))
    stream.add(f)
    np.testing.assert_allclose(minibatch_cka(stream.result()["patch"]), np.ones((3, 3)), atol=1e-9)


def test_one_forward_per_image_and_the_last_block_agrees_with_eval_stages(data):
    cache, seg_root, knn_root = data
    model = tiny_vit("skipless_init")
    train = build_segmentation_dataset("voc", seg_root, "train")
    val = build_segmentation_dataset("voc", seg_root, "val")
    probe = replace(LinProbeConfig(), resolution=32, epochs=2, lrs=(0.01, 0.1), bootstrap=0,
                    num_workers=0)  # fmt: skip
    knn = replace(KNNConfig(), resize=32, crop=32, num_workers=0, batch_size=8)
    seen = []
    hook = model.patch_embed.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    rec = evaluate_model(model, val, cfg(), seg_train=train, probe_cfg=probe, knn_root=knn_root,
                         knn_cfg=knn, progress=False)  # fmt: skip
    hook.remove()
    # every image once: validation scenes (CKA + probe cache), training scenes, k-NN images
    assert sum(seen) == len(val) + len(train) + 24
    assert rec["images"]["n_images"] == 4 * (len(val) // 4) and rec["depth"] == 2
    assert len(rec["knn"]["top1"]) == 2 and len(rec["probe"]["miou"]) == 2
    ref_knn = run_knn(model, knn_root, knn, torch.device("cpu"), progress=False)
    assert rec["knn"]["top1"][-1] == pytest.approx(ref_knn["per_k"]["20"]["top1"])
    images = ImageFolderDataset(knn_root, eval_transform(knn))
    ours, _ = block_cls_features(model, images, knn, torch.device("cpu"), progress=False)
    theirs, _ = extract_cls(model, images, knn, torch.device("cpu"), progress=False)
    assert torch.allclose(ours[-1], theirs, atol=1e-5)  # eval.knn's features: the last block's
    assert not torch.allclose(ours[0], theirs, atol=1e-2)
    ref = probe_backbone(model, train, val, probe, ("single",), progress=False)
    assert rec["probe"]["miou"][-1] == pytest.approx(ref["results"]["single"]["miou"], abs=1e-9)
    assert rec["probe"]["miou"][0] != pytest.approx(rec["probe"]["miou"][1])  # not one block twice
    # the summaries are those of the per-minibatch HSIC the record carries
    again = summarise(rec["hsic_batches"]["patch"], 0.9, 50, 0)
    assert again["adjacent_mean"] == pytest.approx(rec["cka"]["patch"]["adjacent_mean"])


def test_cli_end_to_end(data, tmp_path):
    cache, _, _ = data
    out = tmp_path / "h"
    argv = [
        "--dataset", "synthetic", "--root", str(cache), "--synthetic-n", "48",
        "--synthetic-size", "32", "--random-init", "skip", "--random-init", "skipless_init",
        *TINY_BACKBONE_ARGS, "--batch-images", "4", "--epochs", "1", "--lrs", "0.1",
        "--knn-synthetic-n", "24", "--knn-synthetic-size", "32", "--knn-synthetic-seed", "1",
        "--knn-resize", "32", "--knn-crop", "32", "--num-workers", "0", "--bootstrap", "50",
        "--probe-bootstrap", "0", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert hierarchy.main(argv) == 0
    rec = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in rec["models"]] == ["random-skip", "random-skipless_init"]
    assert rec["config"]["resolution"] == 32 and rec["knn_root"] and rec["probe_config"]
    m = rec["models"][0]
    assert "hsic_batches" not in m and m["cka"]["patch"]["depths"] == ["embed", "0", "1"]
    assert m["cka"]["cls"]["depths"] == ["0", "1"] and "se" in m["cka"]["patch"]["bootstrap"][
        "adjacent_mean"]  # fmt: skip
    assert (out / "hierarchy.png").stat().st_size > 10_000
    assert "adjacent CKA, patch" in (out / "results.md").read_text()
    models = load_results(out)
    assert models[1]["hsic_batches"]["patch"].shape[1:] == (3, 3)
    assert summarise(models[1]["hsic_batches"]["patch"])["first_last"] == pytest.approx(
        rec["models"][1]["cka"]["patch"]["first_last"]
    )
    claim = hierarchy_claim({"skip": [models[0]], "skipless_init": [models[1]]}, n_boot=100,
                            per_model=True)  # fmt: skip
    assert claim["paired"] and claim["verdict"] in ("shown", "not shown", "within noise")
    # the stage states the same claim itself when both variants are among its models
    assert [c["kind"] for c in rec["claims"]] == ["patch", "cls"]
    assert rec["claims"][0]["diff"] == pytest.approx(claim["diff"])
    assert rec["claims"][0]["verdict"] in (results_md := (out / "results.md").read_text())
    assert "lower adjacent-block CKA), patch tokens" in results_md
    # a stale hsic file of another run is refused
    write_npz(out / "hsic_batches.npz", run_id=np.array("other"))
    with pytest.raises(ValueError, match="different runs"):
        load_results(out)


def test_cli_errors(data, tmp_path, capsys):
    cache, _, _ = data
    base = ["--dataset", "synthetic", "--root", str(cache), "--synthetic-n", "48",
            "--synthetic-size", "32", "--random-init", "skip", *TINY_BACKBONE_ARGS,
            "--no-probe", "--no-knn", "--num-workers", "0", "--quiet", "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit, match="at least --batch-images 16 validation images"):
        hierarchy.main(base)
    with pytest.raises(SystemExit) as e:
        hierarchy.main([*base, "--batch-images", "2"])
    assert e.value.code == 2 and "batch_images must be >= 4" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not a multiple of the patch size 8"):
        hierarchy.main([*base, "--resolution", "36"])
    assert not list(tmp_path.iterdir())  # nothing written before the checks


def test_write_npz_is_atomic_and_round_trips(tmp_path):
    write_npz(tmp_path / "a.npz", x=np.arange(3), run_id=np.array("r"))
    with np.load(tmp_path / "a.npz") as z:
        assert z["x"].tolist() == [0, 1, 2] and str(z["run_id"]) == "r"
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]

    def fail(f):
        f.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(tmp_path / "a.npz", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]  # the old file, no temp file
    with np.load(tmp_path / "a.npz") as z:
        assert z["x"].tolist() == [0, 1, 2]


def test_stream_extractor_returns_normed_tokens_of_the_cached_blocks():
    model = tiny_vit("skip")
    x = torch.randn(4, 3, 32, 32)
    stream = CKAStream(cfg())
    f = stream_extractor(stream)(model, x, [1], kind="tokens", norm=True)
    ref = extract(model, x, [1], norm=True)
    assert list(f.tokens) == [1] and torch.allclose(f.tokens[1], ref.tokens[1], atol=1e-6)
    assert stream.used == 4  # ...and the same forward fed the CKA


def test_the_stage_states_the_claim_only_for_one_model_per_variant():
    rng = np.random.default_rng(0)
    from test_hierarchy import fake_results

    def model(variant, step):
        return {"backbone": {"variant": variant}, **fake_results(rng, step)[0]}

    one_each = [model("skip", 0.2), model("skipless", 1.0), model("skipless_init", 1.0)]
    claims = claims_for(one_each)
    assert [c["kind"] for c in claims] == ["patch", "cls"] and claims[0]["verdict"] == "shown"
    # a run and its own init are not two seeds: no claim, the caller groups them
    assert claims_for([*one_each, model("skip", 0.2)]) == []
    assert claims_for(one_each[:2]) == []


def test_probe_caches_on_disk_give_the_same_result_and_are_removed(data, tmp_path):
    _, seg_root, _ = data
    model = tiny_vit("skip")
    train = build_segmentation_dataset("voc", seg_root, "train")
    val = build_segmentation_dataset("voc", seg_root, "val")
    probe = replace(LinProbeConfig(), resolution=32, epochs=1, lrs=(0.1,), bootstrap=0,
                    num_workers=0)  # fmt: skip
    kw = dict(seg_train=train, probe_cfg=probe, progress=False)
    mem = evaluate_model(model, val, cfg(), **kw)
    disk = evaluate_model(model, val, cfg(), cache_dir=tmp_path / "c", **kw)
    assert disk["probe"]["miou"] == pytest.approx(mem["probe"]["miou"], abs=1e-9)
    np.testing.assert_allclose(disk["hsic_batches"]["patch"], mem["hsic_batches"]["patch"])
    assert list((tmp_path / "c").iterdir()) == []
