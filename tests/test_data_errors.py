"""Bad input: missing, corrupt, truncated and size-mismatched files, both error policies, and
the check CLI that reports them."""

import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from dino_skipless.data import ADE20KSegmentation, DatasetError, ImageFolderDataset
from dino_skipless.data.check import main as check_main
from dino_skipless.data.generate import generate


@pytest.fixture(scope="module")
def ade_src(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("ade_src"), "ade20k", n=8, size=48, seed=6).root


@pytest.fixture
def ade(ade_src, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(ade_src, root)
    return root


def _paths(root, image_id):
    base = root / "ADEChallengeData2016"
    return base / f"images/training/{image_id}.jpg", base / f"annotations/training/{image_id}.png"


def _break(root):
    """Damage three training samples: a size-mismatched mask, a truncated JPEG, a corrupt one."""
    _, mask = _paths(root, "ADE_train_00000002")
    Image.fromarray(np.ones((40, 48), np.uint8)).save(mask)
    img, _ = _paths(root, "ADE_train_00000003")
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    img, _ = _paths(root, "ADE_train_00000004")
    img.write_bytes(b"this is not a jpeg")
    return ["ADE_train_00000002", "ADE_train_00000003", "ADE_train_00000004"]


def test_raise_names_the_path(ade):
    _break(ade)
    ds = ADE20KSegmentation(ade, "train")  # nothing decoded yet: construction succeeds
    for image_id, path in (
        ("ADE_train_00000002", _paths(ade, "ADE_train_00000002")[1]),
        ("ADE_train_00000003", _paths(ade, "ADE_train_00000003")[0]),
        ("ADE_train_00000004", _paths(ade, "ADE_train_00000004")[0]),
    ):
        with pytest.raises(DatasetError) as e:
            ds[ds.ids.index(image_id)]
        assert str(path) in str(e.value)
    with pytest.raises(DatasetError, match="48x40"):
        ds[ds.ids.index("ADE_train_00000002")]
    with pytest.raises(DatasetError):
        ADE20KSegmentation(ade, "train", validate=True)


def test_skip_with_validate_drops_and_counts(ade):
    bad = _break(ade)
    ds = ADE20KSegmentation(ade, "train", on_error="skip", validate=True)
    assert ds.skipped == 3 and len(ds) == 6 - 3
    assert not set(bad) & set(ds.ids)
    assert all(any(b in p for b in bad) for p in ds.problems)
    for i in range(len(ds)):
        ds[i]


def test_skip_on_access_substitutes_next_sample(ade):
    _break(ade)
    ds = ADE20KSegmentation(ade, "train", on_error="skip")
    i = ds.ids.index("ADE_train_00000002")
    with pytest.warns(UserWarning) as caught:
        img, mask = ds[i]
    for w, image_id in zip(caught, ("00000002", "00000003", "00000004")):
        assert f"ADE_train_{image_id}" in str(w.message)
    assert len(caught) == 3
    np.testing.assert_array_equal(mask, ADE20KSegmentation(ade, "train")[i + 3][1])
    assert ds.skipped == 3  # 3 and 4 were tried on the way to 5
    ds[i]
    assert ds.skipped == 3  # known-bad samples are not recounted


def test_missing_files(ade):
    img, mask = _paths(ade, "ADE_train_00000005")
    mask.unlink()
    with pytest.raises(DatasetError, match=str(mask)):
        ADE20KSegmentation(ade, "train")
    ds = ADE20KSegmentation(ade, "train", on_error="skip")
    assert ds.skipped == 1 and "ADE_train_00000005" not in ds.ids and str(mask) in ds.problems[0]


def test_imagefolder_corrupt_image(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(DatasetError, match="bad.jpg"):
        ds[ds.ids.index("bad.jpg")]
    ds = ImageFolderDataset(tmp_path, on_error="skip")
    with pytest.warns(UserWarning):
        assert ds[ds.ids.index("bad.jpg")][0].size == (4, 4)
    assert ds.skipped == 1


def test_error_survives_pickling():
    e = pickle.loads(pickle.dumps(DatasetError("mask /x/y.png is 3x4")))
    assert isinstance(e, DatasetError) and str(e) == "mask /x/y.png is 3x4"


def test_check_cli_good_bad_and_missing(ade, tmp_path, capsys):
    out = tmp_path / "good.json"
    assert check_main(["--dataset", "ade20k", "--root", str(ade), "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["images"] == 8 and rep["masks"] == 8 and rep["boxes"] == 0
    assert rep["problems"] == [] and rep["classes_present"] >= 5
    assert set(rep["parts"]) == {"ade20k/train", "ade20k/val"}

    _break(ade)
    out = tmp_path / "bad.json"
    assert check_main(["--dataset", "ade20k", "--root", str(ade), "--json", str(out)]) == 1
    rep = json.loads(out.read_text())
    assert len(rep["problems"]) == 3 and rep["images"] == 5 and not rep["ok"]
    for image_id in ("ADE_train_00000002", "ADE_train_00000003", "ADE_train_00000004"):
        assert any(image_id in p for p in rep["problems"])
    args = ["--dataset", "ade20k", "--root", str(ade), "--split", "val", "--tolerate", "0"]
    assert check_main(args) == 0

    out = tmp_path / "missing.json"
    assert check_main(["--dataset", "voc", "--root", str(tmp_path / "no"), "--json", str(out)]) == 2
    rep = json.loads(out.read_text())
    assert str(tmp_path / "no") in rep["problems"][0] and "Expected layout" in rep["problems"][0]
    assert "Expected layout" in capsys.readouterr().out


def test_out_of_set_label_values_are_reported_not_fatal(ade, tmp_path):
    _, mask_path = _paths(ade, "ADE_train_00000005")
    raw = np.array(Image.open(mask_path))
    raw[:4, :4] = 200  # ADE20K has no class 200
    Image.fromarray(raw).save(mask_path)
    ds = ADE20KSegmentation(ade, "train", validate=True)
    mask = ds[ds.ids.index("ADE_train_00000005")][1]
    assert (mask[:4, :4] == 255).all() and len(ds) == 6
    problems, classes = ds.check_sample(ds.ids.index("ADE_train_00000005"))
    assert "[200]" in problems[0] and str(mask_path) in problems[0] and classes
    out = tmp_path / "r.json"
    assert check_main(["--dataset", "ade20k", "--root", str(ade), "--json", str(out)]) == 1
    assert json.loads(out.read_text())["images"] == 8


def _rand_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def test_check_counts_a_link_loop_once_and_says_so(tmp_path):
    root = tmp_path / "loop"
    for i in range(4):
        _rand_png(root / "a" / f"{i}.png", i)
        _rand_png(root / "b" / f"{i}.png", 10 + i)
    (root / "a" / "up").symlink_to("..")
    out = tmp_path / "r.json"
    assert check_main(["--dataset", "imagefolder", "--root", str(root), "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["images"] == 8 and rep["classes_present"] == 2
    assert any("up" in w and "already walked" in w for w in rep["warnings"])


def test_check_warns_about_the_same_image_in_train_and_val(tmp_path, capsys):
    """The k-NN layout (train/ + val/): a val file that is a copy of (or a link to) a training
    file is named with both paths; as are copies inside one folder that a seeded split may
    separate."""
    root = tmp_path / "knn"
    for i in range(3):
        _rand_png(root / "train" / "c" / f"{i}.png", i)
        _rand_png(root / "val" / "c" / f"{i}.png", 10 + i)
    shutil.copy(root / "train" / "c" / "0.png", root / "val" / "c" / "copy.png")
    (root / "val" / "c" / "link.png").symlink_to(root / "train" / "c" / "1.png")
    out = tmp_path / "r.json"
    assert check_main(["--dataset", "imagefolder", "--root", str(root), "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["parts"]) == {"imagefolder/train", "imagefolder/val"}
    dup = [w for w in rep["warnings"] if "train" in w and "val" in w]
    assert len(dup) == 2, rep["warnings"]
    assert any("copy.png" in w and "0.png" in w and "same content" in w for w in dup)
    assert any("link.png" in w and "1.png" in w and "same file" in w for w in dup)
    assert "warning:" in capsys.readouterr().out

    one = tmp_path / "one"
    _rand_png(one / "a" / "x.png", 0)
    _rand_png(one / "b" / "y.png", 1)
    shutil.copy(one / "a" / "x.png", one / "b" / "x_again.png")
    assert check_main(["--dataset", "imagefolder", "--root", str(one), "--json", str(out)]) == 0
    warns = json.loads(out.read_text())["warnings"]
    assert len(warns) == 1 and "x.png" in warns[0] and "x_again.png" in warns[0]


def test_check_warns_about_a_val_image_copied_from_train(ade):
    base = ade / "ADEChallengeData2016"
    val = sorted((base / "images" / "validation").glob("*.jpg"))[0]
    shutil.copy(base / "images" / "training" / "ADE_train_00000001.jpg", val)
    rep_path = ade / "r.json"
    assert check_main(["--dataset", "ade20k", "--root", str(ade), "--json", str(rep_path)]) == 0
    warns = json.loads(rep_path.read_text())["warnings"]
    assert any("ADE_train_00000001" in w and val.name in w for w in warns), warns
