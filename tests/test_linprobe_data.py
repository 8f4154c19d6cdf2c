"""The linear probe's data and cache under changed files: the disk cache is keyed on content
(weights file read, image and mask files), and mask pixels outside the label set are counted,
warned about once, and refused above a small fraction."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import TINY_BACKBONE_ARGS, tiny_vit
from PIL import Image

from dino_skipless.data import DatasetError, synthetic_root
from dino_skipless.dino.checkpoint import export_backbone
from eval.linprobe import main
from eval.linprobe_lib import build_datasets, probe_backbone
from eval.probe_lib import LinProbeConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(resolution=64, epochs=2, batch_size=4, num_workers=0, extract_batch_size=4, lrs=(0.1,))
CLI = ["--resolution", "64", "--epochs", "2", "--lrs", "0.1", "--num-workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def synth_src(tmp_path_factory):
    return synthetic_root("voc", n=12, size=64, seed=0, cache_dir=tmp_path_factory.mktemp("syn"))


@pytest.fixture
def root(synth_src, tmp_path):
    """A private copy of the synthetic VOC root, to damage."""
    dst = tmp_path / "voc"
    shutil.copytree(synth_src, dst, symlinks=True)
    return dst


def _masks(root, split):
    voc = root / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    return [voc / "SegmentationClass" / f"{i}.png" for i in ids]


def test_training_mask_of_unknown_values_is_refused_or_warned_once(root, tmp_path, capsys):
    bad = _masks(root, "train")[0]
    shape = np.asarray(Image.open(bad)).shape
    Image.fromarray(np.full(shape, 77, np.uint8)).save(bad)  # VOC has no class 77
    cfg = LinProbeConfig(**TINY)
    train_ds, val_ds, _, _ = build_datasets("voc", root, cfg)
    with pytest.raises(DatasetError, match="max_unknown_label_fraction=0.001") as e:
        probe_backbone(tiny_vit(img_size=None), train_ds, val_ds, cfg, progress=False)
    assert str(bad) in str(e.value) and "1 train mask" in str(e.value)

    run = probe_backbone(
        tiny_vit(img_size=None),
        train_ds,
        val_ds,
        replace(cfg, max_unknown_label_fraction=1.0),
        progress=False,
    )
    u = run["unknown_labels"]
    assert u["train"]["pixels"] == shape[0] * shape[1] and u["train"]["n_files"] == 1
    assert u["train"]["files"] == [[str(bad), shape[0] * shape[1]]] and u["val"]["pixels"] == 0

    # the CLI: two backbones on the same data, one warning
    argv = ["--dataset", "voc", "--root", str(root), "--sweep-ckpts", "random:skip",
            "random:skipless", *TINY_BACKBONE_ARGS, *CLI, "--max-unknown-label-fraction", "1",
            "--out", str(tmp_path / "lp")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("outside its label set") == 1 and str(bad) in err
    res = json.loads((tmp_path / "lp" / "random-skip" / "results.json").read_text())
    assert res["unknown_labels"]["train"]["pixels"] == shape[0] * shape[1]


def test_cache_is_keyed_on_the_weights_file_read(root, tmp_path):
    """--ckpt FOLDER whose backbone.pt is overwritten in place: a stat of the folder did not
    change, and the old features were reused."""
    ck = tmp_path / "run"
    export_backbone(tiny_vit("skip", seed=1, img_size=None), ck)
    argv = ["--dataset", "voc", "--root", str(root), "--ckpt", str(ck), *CLI,
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "lp")]  # fmt: skip
    assert main(argv) == 0
    first = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert first["backbone_passes"]["val"] > 0
    sha = hashlib.sha256((ck / "backbone.pt").read_bytes()).hexdigest()
    assert first["checkpoint"]["sha256"] == sha and set(first["cache_key"]) == {"train", "val"}
    assert main(argv) == 0
    again = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert again["backbone_passes"] == {"train": 0, "val": 0}  # a true hit
    assert again["cache_key"] == first["cache_key"]

    other = tmp_path / "other"
    export_backbone(tiny_vit("skip", seed=2, img_size=None), other)
    shutil.copyfile(other / "backbone.pt", ck / "backbone.pt")  # cp over it
    assert main(argv) == 0
    new = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert new["backbone_passes"]["val"] > 0 and new["cache_key"] != first["cache_key"]


def test_cache_is_keyed_on_the_mask_files(root, tmp_path):
    """Replacing the masks of a root gave the old mIoU with backbone_passes 0."""
    argv = ["--dataset", "voc", "--root", str(root), "--random-init", "skip",
            *TINY_BACKBONE_ARGS, *CLI, "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "lp")]  # fmt: skip
    assert main(argv) == 0
    first = json.loads((tmp_path / "lp" / "results.json").read_text())
    for m in _masks(root, "val"):  # every val mask now says background
        Image.fromarray(np.zeros_like(np.asarray(Image.open(m)))).save(m)
    assert main(argv) == 0
    new = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert new["backbone_passes"]["val"] > 0 and new["backbone_passes"]["train"] == 0
    assert new["data_digest"]["val"]["masks"] != first["data_digest"]["val"]["masks"]
    assert new["data_digest"]["val"]["images"] == first["data_digest"]["val"]["images"]
    assert new["miou"] != first["miou"]
