"""ImageFolder reader: recursive search, class folders, synthetic round trip."""

import numpy as np
import pytest
from PIL import Image

from dino_skipless.data import DatasetError, ImageFolderDataset
from dino_skipless.data.generate import generate


def test_synthetic_round_trip(tmp_path):
    truth = generate(tmp_path, "imagefolder", n=12, size=48, seed=5)
    ds = ImageFolderDataset(tmp_path, transform=lambda im: np.asarray(im).shape)
    assert ds.classes == truth.class_names == sorted(truth.class_names)
    assert len(ds) == 12 and sorted(ds.ids) == sorted(truth.labels)
    for i, rel in enumerate(ds.ids):
        shape, label = ds[i]
        assert shape == (48, 48, 3) and label == truth.labels[rel] == ds.targets[i]
    assert sorted(set(ds.targets)) == list(range(6))  # every shape class appears


def test_recursive_optional_class_folders(tmp_path):
    for rel in ("a/x.JPEG", "a/deep/er/y.png", "b/z.webp", "loose.jpg"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (1, 2, 3)).save(p)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty_dir").mkdir()
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == [".", "a", "b"]
    labels = {rel: ds.classes[t] for rel, t in zip(ds.ids, ds.targets)}
    assert labels == {"a/x.JPEG": "a", "a/deep/er/y.png": "a", "b/z.webp": "b", "loose.jpg": "."}
    img, label = ds[ds.ids.index("b/z.webp")]
    assert img.mode == "RGB" and img.size == (8, 6) and label == 2


def test_no_class_folders(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "g.png")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["."] and ds[0][0].mode == "RGB" and ds[0][1] == 0


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    with pytest.raises(DatasetError, match=f"no images found under {tmp_path}"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DatasetError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")


def _pngs(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _labels(ds):
    return {rel: ds.classes[t] for rel, t in zip(ds.ids, ds.targets)}


def test_symlink_loop_counts_every_image_once(tmp_path):
    """DATA/loop/{a,b} with 4 PNGs each and a/up -> .. : 8 images, not 328 (the walk used to
    follow the loop until the path length limit, labelling copies of b's files as a)."""
    root = tmp_path / "loop"
    _pngs(root / "a", 4, 0)
    _pngs(root / "b", 4, 1)
    (root / "a" / "up").symlink_to("..")
    ds = ImageFolderDataset(root)
    assert len(ds) == 8 and ds.classes == ["a", "b"]
    assert sorted(_labels(ds).values()) == ["a"] * 4 + ["b"] * 4
    assert ds.skipped_links == [(root / "a" / "up", root.resolve())]


def test_links_inside_the_root_keep_each_file_under_its_own_class(tmp_path):
    root = tmp_path / "d"
    _pngs(root / "a", 2, 0)
    _pngs(root / "b", 2, 1)
    (root / "a" / "to_b").symlink_to("../b")  # walked before b itself
    (root / "a" / "again.png").symlink_to("../b/0.png")  # a file reached twice
    ds = ImageFolderDataset(root)
    assert _labels(ds) == {"a/0.png": "a", "a/1.png": "a", "b/0.png": "b", "b/1.png": "b"}
    assert len(ds.duplicate_files) == 1 and ds.duplicate_files[0][0] == root / "a" / "again.png"


def test_links_to_folders_outside_the_root_are_followed(tmp_path):
    """The common layout of a dataset made of links into a shared store."""
    _pngs(tmp_path / "store" / "n01", 3, 0)
    root = tmp_path / "train"
    root.mkdir()
    (root / "n01").symlink_to(tmp_path / "store" / "n01")
    (root / "n01_again").symlink_to(tmp_path / "store" / "n01")  # the same folder twice
    ds = ImageFolderDataset(root)
    assert len(ds) == 3 and ds.classes == ["n01"]
    assert ds.skipped_links == [(root / "n01_again", (tmp_path / "store" / "n01").resolve())]
