"""Every tool that pairs two runs (tokencut.compare, eval.knn.paired_knn, eval.compare) refuses
runs made on different images or ground truth, by a digest of their contents; runs written
before digests are still paired by the older checks, with a warning."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import TINY_BACKBONE_ARGS
from PIL import Image

from dino_skipless.digest import DataMismatch, require_same_data
from eval import knn
from eval.compare import compare_runs
from tokencut import compare as tc_compare
from tokencut import run as tc_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_require_same_data():
    d = {"images": "1", "ground_truth": "2"}
    assert require_same_data(d, dict(d)) is None
    with pytest.raises(DataMismatch, match=r"their ground_truth differ\): use the same"):
        require_same_data(d, {**d, "ground_truth": "3"}, "use the same --root")
    with pytest.raises(DataMismatch, match="ground_truth and images differ"):
        require_same_data(d, {"images": "0", "ground_truth": "0"})
    assert "run B records no data digest" in require_same_data(d, None)


# ------------------------------------------------------------------------------------ TokenCut

TC = ["--dataset", "synthetic", "--synthetic-n", "6", "--synthetic-size", "48",
      "--random-init", "skip", *TINY_BACKBONE_ARGS, "--num-workers", "0", "--quiet"]  # fmt: skip


def _tc(tmp_path, name, *extra):
    out = tmp_path / name
    assert tc_run.main([*TC, "--root", str(tmp_path / "cache"), "--out", str(out), *extra]) == 0
    return out


def _refused(a, b, *words):
    with pytest.raises(SystemExit) as e:
        tc_compare.main([str(a), str(b)])
    msg = str(e.value.code)
    assert "not made on the same data" in msg and "Traceback" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_tokencut_compare_refuses_other_images_or_ground_truth(tmp_path, capsys):
    a = _tc(tmp_path, "a")
    b = _tc(tmp_path, "b")
    assert tc_compare.main([str(a), str(b)]) == 0  # the same scenes: paired
    assert "6 paired images" in capsys.readouterr().out
    # another seed: the same image ids, other images (this printed "6 paired images")
    _refused(a, _tc(tmp_path, "seed", "--synthetic-seed", "1"), "images")
    _refused(a, _tc(tmp_path, "size", "--synthetic-size", "56"), "images")

    # the same images with one ground-truth box moved
    src = next((tmp_path / "cache").glob("voc_n6_s48_seed0*"))
    edited = tmp_path / "edited"
    shutil.copytree(src, edited)
    xml = sorted((edited / "VOCdevkit" / "VOC2012" / "Annotations").glob("*.xml"))[0]
    xml.write_text(re.sub(r"<xmin>(\d+)</xmin>", lambda m: f"<xmin>{int(m[1]) + 3}</xmin>",
                          xml.read_text(), count=1))  # fmt: skip
    out = tmp_path / "gt"
    argv = [*TC, "--dataset", "voc12", "--root", str(edited), "--out", str(out)]
    assert tc_run.main(argv) == 0
    _refused(a, out, "ground_truth")


def test_tokencut_runs_without_digest_pair_on_their_boxes_with_a_warning(tmp_path, capsys):
    a = _tc(tmp_path, "a")
    old = json.loads((a / "results.json").read_text())
    old.pop("data_digest")
    (tmp_path / "old.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert tc_compare.main([str(a), str(tmp_path / "old.json")]) == 0
    assert "records no data digest" in capsys.readouterr().err
    old["per_image"][0]["gt_boxes"][0][0] += 1  # what an old record can still be checked on
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="ground truth"):
        tc_compare.main([str(a), str(tmp_path / "old.json")])


# ---------------------------------------------------------------------------------------- k-NN

KNN = ["--dataset", "imagefolder", "--resize", "32", "--crop", "32", "--num-workers", "0",
       "--random-init", "skip", *TINY_BACKBONE_ARGS, "--quiet", "--k", "3"]  # fmt: skip


def test_paired_knn_refuses_other_val_images_with_the_same_labels(tmp_path):
    from dino_skipless.data import synthetic_root

    src = synthetic_root("imagefolder", n=24, size=32, seed=0, cache_dir=tmp_path / "syn")
    other = tmp_path / "other"
    shutil.copytree(src, other)
    # other images in the same class folders: the label digest could not tell
    images = sorted(other.rglob("*.jpg"))
    assert images
    for p in images:
        Image.fromarray(255 - np.asarray(Image.open(p).convert("RGB"))).save(p)
    runs = []
    for root, name in ((src, "a"), (src, "b"), (other, "c")):
        assert knn.main([*KNN, "--root", str(root), "--out", str(tmp_path / name)]) == 0
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert runs[0]["val_digest"] == runs[2]["val_digest"]  # the labels agree
    assert knn.paired_knn(runs[0], runs[1])["n"] == runs[0]["n_val"]
    with pytest.raises(DataMismatch, match="images differ"):
        knn.paired_knn(runs[0], runs[2])


# ------------------------------------------------------------------------------- linear probe


def test_eval_compare_refuses_other_val_images_with_the_same_masks(tmp_path):
    from dino_skipless.data import synthetic_root
    from eval import linprobe

    src = synthetic_root("voc", n=8, size=48, seed=0, cache_dir=tmp_path / "syn")
    other = tmp_path / "other"
    shutil.copytree(src, other)
    images = sorted(other.rglob("JPEGImages/*.jpg"))
    assert images
    for p in images:
        Image.fromarray(255 - np.asarray(Image.open(p).convert("RGB"))).save(p)
    common = ["--dataset", "voc", "--random-init", "skip", *TINY_BACKBONE_ARGS,
              "--resolution", "48", "--epochs", "1", "--lrs", "0.1", "--num-workers", "0",
              "--bootstrap", "10", "--quiet"]  # fmt: skip
    for root, name in ((src, "a"), (other, "b")):
        assert linprobe.main([*common, "--root", str(root), "--out", str(tmp_path / name)]) == 0
    with pytest.raises(DataMismatch, match="images differ"):
        compare_runs(str(tmp_path / "a"), str(tmp_path / "b"), n_boot=10)
