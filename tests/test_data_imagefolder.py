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
