"""User errors at every evaluation CLI: one or two lines naming the path and what was expected,
a non-zero exit, no traceback; ``--debug`` re-raises with the traceback."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from torch.utils.data import DataLoader, Dataset

from dino_skipless import jacobian, pca
from dino_skipless.cli import error_message
from dino_skipless.data import DatasetError
from dino_skipless.models import CheckpointError
from eval import compare as lp_compare
from eval import knn, linprobe
from tokencut import compare as tc_compare
from tokencut import run as tc_run

RANDOM = ["--random-init", "skip", "--arch", "vit_mini", "--patch-size", "8", "--device", "cpu"]


def _fails_briefly(main, argv, *expected):
    """``main(argv)`` exits non-zero with a short message (the reader's layout help aside) that
    contains every ``expected`` and no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and isinstance(e.value.code, str), msg
    body = msg.split("\nExpected layout under --root:")[0]  # the layout a reader wants, if any
    assert len(body.splitlines()) <= 5 and "Traceback" not in msg and 'File "' not in msg, msg
    for want in expected:
        assert str(want) in msg, (want, msg)
    return msg


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "junk.pt").write_bytes(b"\x00 not a pickle at all" * 20)
    # backbone.json says depth 3, the weights have 2 blocks
    m = tiny_vit("skip")
    torch.save(m.state_dict(), d / "backbone.pt")
    (d / "backbone.json").write_text(json.dumps({**m.spec.to_dict(), "depth": 3}))
    (d / "empty").mkdir()
    return d


def test_missing_root_each_cli(files, tmp_path):
    missing = tmp_path / "nowhere"
    _fails_briefly(linprobe.main, ["--dataset", "voc", "--root", str(missing), *RANDOM], missing)
    _fails_briefly(tc_run.main, ["--dataset", "voc07", "--root", str(missing), *RANDOM], missing)
    _fails_briefly(knn.main, ["--root", str(files / "empty"), *RANDOM], files / "empty")
    args = ["--dataset", "voc", "--root", str(missing), "--out", str(tmp_path / "p.png")]
    _fails_briefly(pca.main, [*args, *RANDOM], missing)


def test_bad_checkpoints_each_cli(files, tmp_path):
    missing = tmp_path / "none.pt"
    out = ["--out", str(tmp_path / "o")]
    _fails_briefly(
        linprobe.main, ["--dataset", "voc", "--ckpt", str(missing)], "not found", missing
    )
    _fails_briefly(tc_run.main, ["--dataset", "voc07", "--ckpt", str(files / "junk.pt")], "junk.pt")
    msg = _fails_briefly(knn.main, ["--ckpt", str(files / "junk.pt")], "cannot read", "junk.pt")
    assert msg.startswith("error: ") and msg.endswith("(--debug shows the traceback)")
    _fails_briefly(jacobian.main, ["--ckpt", str(files / "junk.pt"), *out], "junk.pt")
    args = ["--ckpt", str(files / "backbone.pt"), "--dataset", "synthetic", *out]
    msg = _fails_briefly(pca.main, args, "backbone.pt")
    assert "blocks.2." in msg  # the spec/weights disagreement is named


def test_debug_shows_the_traceback(files):
    with pytest.raises(CheckpointError, match="cannot read"):
        knn.main(["--ckpt", str(files / "junk.pt"), "--debug"])


def test_compare_tools_name_the_missing_run(tmp_path):
    with pytest.raises(SystemExit, match="per_image_counts.npz not found"):
        lp_compare.main([str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="no TokenCut results"):
        tc_compare.main([str(tmp_path / "a"), str(tmp_path / "b")])


class _Broken(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise DatasetError(f"image /data/img{i}.jpg is truncated\nExpected a readable JPEG")


def test_worker_errors_are_unwrapped():
    """PyTorch prepends the worker's traceback to the message; the user sees the original."""
    loader = DataLoader(_Broken(), num_workers=1, batch_size=1)
    with pytest.raises(DatasetError) as e:
        next(iter(loader))
    assert "Original Traceback" in str(e.value)  # what would be printed without unwrapping
    assert error_message(e.value) == "image /data/img0.jpg is truncated\nExpected a readable JPEG"
