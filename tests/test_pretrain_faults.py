"""The trainer under faults (issue 18): bad images, kills during saves, NaN, resumed reporting,
and a BatchNorm head under DDP. Tiny config and data of ``test_pretrain_train``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image
from test_pretrain_train import (
    BATCH,
    N_IMAGES,
    TINY,
    _NaNAt,
    tiny_cfg,
)

from dino_skipless.data import DatasetError
from dino_skipless.dino import checkpoint as checkpoint_mod
from dino_skipless.dino import decode
from dino_skipless.dino import state as state_mod
from dino_skipless.dino import trainer as trainer_mod
from dino_skipless.dino.config import ConfigError
from dino_skipless.dino.distributed import DistEnv
from dino_skipless.dino.runlog import read_jsonl
from dino_skipless.dino.trainer import NonFiniteLossError, train
from dino_skipless.pretrain import main

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 8  # 2 epochs x 4 iterations


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"), seed=1, n=N_IMAGES)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    """16 images in two folders, one of them not an image at all."""
    root = write_image_folder(tmp_path_factory.mktemp("bad_imgs"), n=N_IMAGES)
    (root / "class1" / "05.png").write_bytes(b"not an image")
    return root


# ---------------------------------------------------------------------------------------------
# point 4: data.on_error
# ---------------------------------------------------------------------------------------------


class _Images:
    """``base[i] -> (label i, i)``; the indices in ``bad`` raise DatasetError as load_rgb does."""

    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise DatasetError(f"corrupt or truncated image img{i}.png: cannot identify")
        return f"image{i}", i


def test_replacement_is_a_seeded_draw_of_seed_epoch_index():
    base = _Images(10, bad={3})
    assert decode.load_image(base, 0, 1, 4, "skip") == ("image4", decode.OK, "")
    img, status, problem = decode.load_image(base, 7, 2, 3, "skip")
    # independent of the module: the first draw of SeedSequence([seed, epoch, index, attempt])
    # that is neither the bad index nor unreadable
    draws = [int(np.random.SeedSequence([7, 2, 3, a]).generate_state(1)[0]) % 10 for a in range(5)]
    expected = next(j for j in draws if j != 3)
    assert (img, status) == (f"image{expected}", decode.REPLACED)
    assert (
        problem.startswith("corrupt or truncated image img3.png") and f"image {expected}" in problem
    )
    assert decode.load_image(base, 7, 2, 3, "skip") == (img, status, problem)  # deterministic
    others = {decode.load_image(base, 7, e, 3, "skip")[0] for e in range(20)}
    assert len(others) > 3  # other epochs, other replacements
    # a replacement that is bad itself is passed over; all bad: unusable, not an endless loop
    assert decode.load_image(_Images(10, bad={3, expected}), 7, 2, 3, "skip")[0] != img
    _, status, problem = decode.load_image(_Images(4, bad=range(4)), 0, 0, 1, "skip")
    assert status == decode.UNUSABLE and "none of 32 images" in problem
    img, status, problem = decode.load_image(base, 0, 0, 3, "raise")
    assert status == decode.UNUSABLE and isinstance(img, Image.Image) and "img3.png" in problem


def test_bad_image_raise_is_one_line_naming_file_and_check(tmp_path, bad_dir):
    """With loader workers the error used to be a worker's traceback."""
    out = tmp_path / "raise"
    argv = [f"data.path={bad_dir}", f"--out={out}", "data.num_workers=2"]
    argv += [f"{k}={v}" for k, v in TINY.items() if k != "data.num_workers"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg and "worker" not in msg
    assert str(bad_dir / "class1" / "05.png") in msg
    assert "python -m dino_skipless.data.check --dataset imagefolder --root" in msg
    assert "data.on_error=skip" in msg
    assert "ERROR: corrupt or truncated image" in (out / "log.txt").read_text()


@pytest.mark.slow  # loader workers: ~18 s on a busy 2-core machine
def test_bad_image_skip_counts_and_resumes_exactly(tmp_path, bad_dir):
    skip = {"data.on_error": "skip", "data.max_bad_fraction": 0.1}
    full = train(tiny_cfg(tmp_path / "full", bad_dir, **skip))
    assert full.step == STEPS and full.bad_images_skipped == 2  # once per epoch
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["bad_images_skipped"] == 2
    recs = read_jsonl(tmp_path / "full" / "log.jsonl")
    assert recs[-1]["bad_images_skipped"] == 2 and recs[0]["bad_images_skipped"] in (0, 1)
    text = (tmp_path / "full" / "log.txt").read_text()
    warned = [ln for ln in text.splitlines() if "WARNING: step" in ln]
    assert len(warned) == 2 and all(str(bad_dir / "class1" / "05.png") in ln for ln in warned)
    assert all("data.on_error=skip" in ln and "replaced by" in ln for ln in warned)

    # interrupted after 3 steps, with loader workers, and resumed: the same replacements
    out = tmp_path / "resumed"
    first = train(tiny_cfg(out, bad_dir, **skip, **{"run.max_steps": 3, "data.num_workers": 2}))
    assert first.step == 3
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"x" * 1000)  # a kill during a save
    (out / ".backbone.pt.k1ll3d.tmp").write_bytes(b"x")
    (out / ".notes.tmp").write_text("not ours")
    second = main(["--out", str(out), "--resume"])
    assert first.losses + second.losses == full.losses
    assert second.bad_images_skipped == 2
    assert json.loads((out / "summary.json").read_text())["bad_images_skipped"] == 2
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == list(range(STEPS))
    # point 5: stale temp files of our atomic writes are gone, other files are kept
    assert sorted(p.name for p in out.glob(".*.tmp")) == [".notes.tmp"]


def test_bad_image_skip_stops_above_max_fraction(tmp_path, bad_dir):
    out = tmp_path / "frac"
    cfg = tiny_cfg(out, bad_dir, **{"data.on_error": "skip", "data.max_bad_fraction": 0.05})
    with pytest.raises(DatasetError) as e:
        train(cfg)
    msg = str(e.value)  # 1 of 16 = 0.0625 > 0.05
    assert "1 of the 16 samples of epoch 0 were unreadable" in msg and "0.05" in msg
    assert "dino_skipless.data.check" in msg and "\n" not in msg
    assert "ERROR: data.on_error=skip: 1 of the 16" in (out / "log.txt").read_text()


def test_on_error_is_validated():
    with pytest.raises(ConfigError, match="data.on_error='ignore' is not valid; expected one"):
        tiny_cfg("o", "d", **{"data.on_error": "ignore"})
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction must be in \[0, 1\]"):
        tiny_cfg("o", "d", **{"data.max_bad_fraction": 2})


# ---------------------------------------------------------------------------------------------
# point 5: a kill during the very first save
# ---------------------------------------------------------------------------------------------


def test_restart_after_kill_in_first_save_rotates_log_and_cleans(tmp_path, monkeypatch, good_dir):
    out = tmp_path / "run"

    real_save = checkpoint_mod.atomic_torch_save

    def killed_save(obj, path):
        if path.name != "checkpoint.pt":  # the init export before step 0 goes through
            return real_save(obj, path)
        (path.parent / f".{path.name}.abc123.tmp").write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # what a kill leaves: a temp file, no checkpoint

    with monkeypatch.context() as m:
        m.setattr(checkpoint_mod, "atomic_torch_save", killed_save)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_cfg(out, good_dir, **{"run.max_steps": 3}))
    assert not (out / "checkpoint.pt").exists()
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [0, 1, 2]

    result = train(tiny_cfg(out, good_dir))
    assert result.step == STEPS
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == list(range(STEPS))
    assert not list(out.glob(".*.tmp"))
    (previous,) = (out / "previous").iterdir()
    assert [r["step"] for r in read_jsonl(previous / "log.jsonl")] == [0, 1, 2]
    assert "moved to" in (out / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------
# point 6: the non-finite-loss message says what is on disk, and is in log.txt
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "every, on_disk",
    [
        (0, "No checkpoint was written yet (run.ckpt_every_steps=0"),
        (2, "checkpoint.pt (step 2) is left unchanged; --resume continues from it"),
    ],
)
def test_nonfinite_message_says_what_is_on_disk(tmp_path, monkeypatch, good_dir, every, on_disk):
    out = tmp_path / "nan"
    _NaNAt(monkeypatch, 3)
    with pytest.raises(NonFiniteLossError) as e:
        train(tiny_cfg(out, good_dir, **{"run.ckpt_every_steps": every}))
    msg = str(e.value)
    assert "at step 3 (epoch 0, iteration 3)" in msg and on_disk in msg
    assert (out / "checkpoint.pt").exists() == (every > 0)
    assert f"ERROR: {msg}" in (out / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------
# point 8: a resumed run reports as the uninterrupted one
# ---------------------------------------------------------------------------------------------


def _ticking_clock(monkeypatch):
    """The trainer's clock advances 10 s per loss evaluation, i.e. per training step."""
    clock = {"t": 1000.0}
    real = trainer_mod.DINOLoss

    class TickLoss(real):
        def forward(self, *args):
            clock["t"] += 10.0
            return super().forward(*args)

    monkeypatch.setattr(trainer_mod, "DINOLoss", TickLoss)
    monkeypatch.setattr(state_mod, "_clock", lambda: clock["t"])


def _epoch_lines(out):
    return [
        ln.split(" ", 2)[2]
        for ln in (out / "log.txt").read_text().splitlines()
        if "mean loss" in ln
    ]


def test_resumed_epoch_mean_and_time_match_uninterrupted(tmp_path, monkeypatch, good_dir):
    _ticking_clock(monkeypatch)
    full = train(tiny_cfg(tmp_path / "full", good_dir))
    out = tmp_path / "resumed"
    first = train(tiny_cfg(out, good_dir, **{"run.max_steps": 3}))
    second = main(["--out", str(out), "--resume"])
    assert first.losses + second.losses == full.losses

    niter = N_IMAGES // BATCH
    losses = full.losses
    expected = [
        f"epoch 1/2: mean loss {sum(losses[:niter]) / niter:.4f} (step 4, 40s)",
        f"epoch 2/2: mean loss {sum(losses[niter:]) / niter:.4f} (step 8, 80s)",
    ]
    assert _epoch_lines(tmp_path / "full") == expected
    assert _epoch_lines(out) == expected
    for run in (tmp_path / "full", out):
        assert json.loads((run / "summary.json").read_text())["time_s"] == 80.0


# ---------------------------------------------------------------------------------------------
# point 13: a BatchNorm head with several processes
# ---------------------------------------------------------------------------------------------


def test_bn_head_with_several_processes_is_refused_in_one_line(tmp_path, monkeypatch):
    two = DistEnv(0, 2, 0, torch.device("cpu"), "gloo")
    monkeypatch.setattr(trainer_mod, "init_distributed", lambda device, timeout_s=None: two)
    with pytest.raises(SystemExit) as e:
        main(["dino.use_bn_in_head=true", f"--out={tmp_path}", "model.arch=vit_mini"])
    msg = str(e.value)
    assert msg.startswith("error: dino.use_bn_in_head=true with 2 processes is not supported")
    assert "SyncBatchNorm" in msg and "\n" not in msg
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_bn_head_single_process_still_trains(tmp_path, good_dir):
    result = train(tiny_cfg(tmp_path / "bn", good_dir, **{"dino.use_bn_in_head": True}))
    assert result.step == STEPS and np.isfinite(result.final_loss)


def test_oom_in_the_device_augmentation_gives_the_batch_size_message(
    tmp_path, monkeypatch, good_dir
):
    """The batched augmentation allocates the most per batch; its OOM used to escape the step's
    handler (the call sat before the ``try``) as a raw traceback."""

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(trainer_mod, "device_multicrop", oom)
    argv = [f"data.path={good_dir}", f"--out={tmp_path / 'oom'}", "data.augment_on=device"]
    argv += [f"{k}={v}" for k, v in TINY.items()]
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value)
    assert msg.startswith(f"error: out of memory with data.batch_size_per_gpu={BATCH} on cpu")
    assert f"data.batch_size_per_gpu={BATCH // 2}" in msg and "\n" not in msg
