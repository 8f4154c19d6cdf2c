"""Synthetic writer: determinism, the CLI, the cache, and what the scenes contain."""

import json
import os

import numpy as np
import pytest

from dino_skipless.data import (
    SYNTHETIC_FORMATS,
    ImageFolderDataset,
    build_detection_dataset,
    synthetic_root,
)
from dino_skipless.data.check import main as check_main
from dino_skipless.data.generate import generate
from dino_skipless.data.scenes import (
    THING_KINDS,
    object_boundaries,
    pattern_mask,
    render_scene,
    render_texture,
)
from dino_skipless.data.synthetic import main


def _tree(root):
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("fmt", SYNTHETIC_FORMATS)
def test_deterministic_and_checkable(tmp_path, fmt):
    a = _tree(generate(tmp_path / "a", fmt, n=5, size=40, seed=7).root)
    b = _tree(generate(tmp_path / "b", fmt, n=5, size=40, seed=7).root)
    c = _tree(generate(tmp_path / "c", fmt, n=5, size=40, seed=8).root)
    assert a == b and a != c
    dataset = {"ade20k": "ade20k", "cocostuff": "cocostuff"}.get(fmt, fmt)
    assert check_main(["--dataset", dataset, "--root", str(tmp_path / "a")]) == 0


def test_cli_writes_a_root(tmp_path, capsys):
    assert (
        main(["--out", str(tmp_path), "--format", "voc", "--n", "4", "--size", "32", "--seed", "0"])
        == 0
    )
    assert "wrote synthetic voc" in capsys.readouterr().out
    for year in ("VOC2012", "VOC2007"):
        assert (tmp_path / "VOCdevkit" / year / "ImageSets/Main/trainval.txt").is_file()
    assert len(build_detection_dataset("voc07", tmp_path)) == 4
    # a bad number is refused at parse time with its range, exit 1 (issue 33), not status 2
    with pytest.raises(SystemExit, match="argument --n: must be >= 1, got '0'"):
        main(["--out", str(tmp_path), "--format", "voc", "--n", "0"])


def test_vary_sizes(tmp_path):

    generate(tmp_path, "imagefolder", n=6, size=64, seed=0, vary=True)
    sizes = {ImageFolderDataset(tmp_path)[i][0].size for i in range(6)}
    assert len(sizes) > 1 and all(48 <= s <= 80 for wh in sizes for s in wh)


def test_synthetic_root_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPLESS_CACHE", str(tmp_path / "cache"))
    root = synthetic_root("coco20k", n=4, size=32, seed=1)
    assert root == tmp_path / "cache" / "synthetic" / "coco20k_n4_s32_seed1"
    manifest = root / "synthetic.json"
    stamp = manifest.stat().st_mtime_ns
    assert synthetic_root("coco20k", n=4, size=32, seed=1) == root
    assert manifest.stat().st_mtime_ns == stamp  # reused, not regenerated
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]  # no temp dirs left
    # A copy from another generator version (or a half-written one) is replaced.
    m = json.loads(manifest.read_text())
    m["generator_version"] = -1
    manifest.write_text(json.dumps(m))
    assert synthetic_root("coco20k", n=4, size=32, seed=1) == root
    assert json.loads(manifest.read_text())["generator_version"] != -1
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]
    other = synthetic_root("imagefolder", n=3, size=32, cache_dir=tmp_path / "x")
    assert other.parent == tmp_path / "x" and (other / "synthetic.json").is_file()
    with pytest.raises(ValueError):
        synthetic_root("kitti", cache_dir=tmp_path / "x")


def test_scene_contents():
    kinds, stuff, n_obj, crowd, difficult, trunc = set(), set(), [], 0, 0, 0
    for i in range(40):
        sc = render_scene(np.random.default_rng([0, i]), 64, 64)
        stuff |= set(np.unique(sc.stuff).tolist())
        kinds |= {o.kind for o in sc.objects}
        n_obj.append(len(sc.objects))
        crowd += sum(o.crowd for o in sc.objects)
        difficult += sum(o.difficult for o in sc.objects)
        trunc += sum(o.truncated for o in sc.objects)
        for k, o in enumerate(sc.objects, 1):
            ys, xs = np.nonzero(sc.instances == k)
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == o.box and len(xs) == o.area
    assert kinds == set(range(len(THING_KINDS))) and len(stuff) >= 5  # all kinds + "other"
    assert min(n_obj) >= 1 and max(n_obj) <= 4 and len(set(n_obj)) > 1
    assert crowd and difficult and trunc
    sc = render_scene(np.random.default_rng(0), 64, 64, n_objects=(0, 0))
    assert sc.objects == [] and not object_boundaries(sc.instances).any()
    sc = render_scene(np.random.default_rng(0), 64, 64, dominant=3)
    assert sc.dominant_kind() == 3


@pytest.mark.parametrize(
    "kind,fraction",
    [("plain", 0.0), ("stripes", 0.5), ("checker", 0.5), ("dots", np.pi / 9),
     ("rings", 0.5), ("zigzag", 0.5)],
)  # fmt: skip
def test_pattern_area_fractions(kind, fraction):
    # Over whole periods the second colour covers the pattern's area fraction.
    u, v = np.meshgrid(np.linspace(0, 6, 1200, endpoint=False), np.linspace(0, 6, 1200))
    m = pattern_mask(THING_KINDS.index(kind), u, v, u)  # rings: bands of radius, like u
    assert m.mean() == pytest.approx(fraction, abs=0.01)


def test_class_folder_images_are_full_frame_textures(tmp_path):
    from PIL import Image

    truth = generate(tmp_path, "imagefolder", n=12, size=48, seed=2)
    for rel, label in truth.labels.items():
        kind = rel.split("/")[0]
        assert truth.class_names[label] == kind
        img = np.asarray(Image.open(tmp_path / rel).convert("RGB"), dtype=np.float64)
        # A plain image is one colour under a smooth ramp; a pattern alternates two colours of
        # hues 0.3-0.7 apart over the whole frame (their luminance may coincide, so use RGB).
        rough = np.abs(np.diff(img, axis=1)).sum(-1).mean()
        assert (rough < 10) == (kind == "plain"), (rel, rough)
    a = render_texture(np.random.default_rng(0), 40, 56, 2)
    assert a.shape == (40, 56, 3) and a.dtype == np.uint8
    assert (a == render_texture(np.random.default_rng(0), 40, 56, 2)).all()


def test_cocostuff_without_truth_splits_four_to_one(tmp_path):
    # (A wall-clock bound used to sit here; timing belongs in benchmarks, and it failed on
    # loaded machines.)
    generate(tmp_path, "cocostuff", n=40, size=128, seed=0, keep_truth=False)
    assert len(os.listdir(tmp_path / "images/train2017")) == 32
