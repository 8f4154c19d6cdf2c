"""End-to-end DINO trainer on CPU: export, schedules in the log, exact resume, refusals, NaN."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_PRETRAIN, tiny_pretrain_config

from dino_skipless.data import ImageFolderDataset
from dino_skipless.dino import AugConfig, MultiCropAugmentation
from dino_skipless.dino import trainer as trainer_mod
from dino_skipless.dino.checkpoint import ResumeError
from dino_skipless.dino.runlog import read_jsonl
from dino_skipless.dino.sampling import EpochSampler, SeededMultiCrop
from dino_skipless.dino.trainer import NonFiniteLossError, build_student_teacher, train
from dino_skipless.models import load_backbone
from dino_skipless.pretrain import main

N_IMAGES, BATCH, EPOCHS = 16, 4, 2  # 4 iterations per epoch, 8 steps
TINY = TINY_PRETRAIN


pytestmark = pytest.mark.usefixtures("one_thread")


tiny_cfg = tiny_pretrain_config


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, image_dir):
    """The uninterrupted reference run (8 steps)."""
    out = tmp_path_factory.mktemp("full")
    result = train(tiny_cfg(out, image_dir))
    return out, result


def test_end_to_end_exports_loadable_backbone(full_run):
    out, result = full_run
    assert result.step == N_IMAGES // BATCH * EPOCHS and not result.stopped_early
    for name in ("checkpoint.pt", "backbone.pt", "backbone.json", "config.yaml", "log.jsonl"):
        assert (out / name).exists(), name
    assert (out / "checkpoint_epoch0001.pt").exists() and (out / "backbone_epoch0001.pt").exists()
    # weights_only=True with no allow-list: our checkpoint holds only tensors, containers, numbers
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = tiny_cfg(out, "unused")
    _, teacher = build_student_teacher(cfg)
    teacher.load_state_dict(ckpt["teacher"])
    teacher.eval()
    model, spec = load_backbone(out)
    assert spec.variant == "skipless_init" and spec.depth == 2 and spec.patch_size == 8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), teacher.backbone(x))
        # the checkpoint itself is a backbone too (teacher keys + meta)
        from_ckpt, _ = load_backbone(out / "checkpoint.pt")
        assert torch.equal(from_ckpt(x), model(x))
    # training moved the teacher away from its initialisation
    init_student, _ = build_student_teacher(cfg)
    assert not torch.equal(
        init_student.backbone.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight
    )


def test_init_export_is_the_runs_own_initialisation(full_run):
    """DIR/init holds the backbone before step 0: the same weights build_student_teacher gives
    for this config (its seed), and different from the trained export."""
    out, _ = full_run
    init, spec = load_backbone(out / "init")
    trained, _ = load_backbone(out)
    assert spec.variant == "skipless_init" and spec.depth == 2
    student, _ = build_student_teacher(tiny_cfg(out, "unused"))
    ref = student.backbone.state_dict()
    got = init.state_dict()
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    assert not torch.equal(
        got["blocks.0.attn.qkv.weight"], trained.state_dict()["blocks.0.attn.qkv.weight"]
    )


def test_log_follows_dino_schedules(full_run):
    """lr/wd/momentum/teacher temp of every logged step equal the published formulas."""
    out, result = full_run
    recs = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in recs] == list(range(8))
    assert [r["loss"] for r in recs] == pytest.approx(result.losses, abs=0)
    niter, total = 4, 8
    base = 0.02 * BATCH / 256  # linear scaling rule
    warm = np.linspace(0, base, niter)  # 1 warm-up epoch, np.linspace as DINO
    for r in recs:
        it = r["step"]
        if it < niter:
            lr = warm[it]
        else:
            j, n = it - niter, total - niter
            lr = 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * j / n))
        wd = 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * it / total))
        mom = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * it / total))
        assert r["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-15)
        assert r["wd"] == pytest.approx(wd, rel=1e-12)
        assert r["momentum"] == pytest.approx(mom, rel=1e-12)
        # 30 warm-up epochs truncated to 2: np.linspace(0.04, 0.07, 30)[epoch]
        assert r["teacher_temp"] == pytest.approx(0.04 + 0.03 * r["epoch"] / 29)
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        # entropies of a distribution over out_dim outputs, and H(mean) >= mean H (concavity)
        assert 0 <= r["teacher_entropy"] <= r["teacher_batch_entropy"] + 1e-6
        assert r["teacher_batch_entropy"] <= math.log(256) + 1e-6
        assert r["img_per_s"] > 0 and r["mem_gb"] > 0


def test_exact_resume_mid_epoch(tmp_path, image_dir, full_run):
    """Killed after 3 steps (mid epoch 0, last layer still frozen) and resumed == uninterrupted."""
    ref_out, ref = full_run
    out = tmp_path / "resumed"
    first = train(tiny_cfg(out, image_dir, **{"run.max_steps": 3, "run.ckpt_every_steps": 2}))
    assert first.stopped_early and first.step == 3
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3
    # resume through the CLI: the checkpoint's config is reused (max_steps dropped)
    second = main(["--out", str(out), "--resume"])
    assert second.step == 8
    assert second.losses == ref.losses[3:]  # bit-exact on CPU/fp32
    assert [r["loss"] for r in read_jsonl(out / "log.jsonl")] == ref.losses
    a = torch.load(ref_out / "checkpoint.pt", weights_only=False)
    b = torch.load(out / "checkpoint.pt", weights_only=False)
    for part in ("teacher", "student"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    # the resumed run kept the first run's init export (it is not the resume point's weights)
    for k, v in load_backbone(ref_out / "init")[0].state_dict().items():
        assert torch.equal(v, load_backbone(out / "init")[0].state_dict()[k]), k


def test_resume_refuses_other_variant(full_run, capsys):
    out, _ = full_run
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--resume", "--variant", "skip", "--optimizer", "soap"])
    msg = str(e.value)
    assert "variant: checkpoint 'skipless_init' vs this run 'skip'" in msg
    assert "optimizer: checkpoint 'adamw' vs this run 'soap'" in msg


def test_fresh_run_refuses_existing_checkpoint(full_run, image_dir):
    out, _ = full_run
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_cfg(out, image_dir))


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        main(["--out", str(tmp_path / "nothing"), "--resume"])


class _NaNAt:
    """Patch DINOLoss so its n-th call (0-based, counted across the patch) returns NaN."""

    def __init__(self, monkeypatch, n):
        real = trainer_mod.DINOLoss
        calls = {"n": 0}

        class NaNLoss(real):
            def forward(self, s, t, epoch):
                loss = super().forward(s, t, epoch)
                calls["n"] += 1
                return loss * float("nan") if calls["n"] - 1 == n else loss

        monkeypatch.setattr(trainer_mod, "DINOLoss", NaNLoss)


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, image_dir, full_run, monkeypatch):
    out = tmp_path / "nan"
    out.mkdir()
    # the reference run's epoch-1 snapshot is a full checkpoint at step 4
    shutil.copy(full_run[0] / "checkpoint_epoch0001.pt", out / "checkpoint.pt")
    digest = hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest()
    _NaNAt(monkeypatch, 2)  # third step after resuming: global step 6
    cfg = tiny_cfg(out, image_dir)
    with pytest.raises(NonFiniteLossError, match=r"at step 6 \(epoch 1, iteration 2\)"):
        train(cfg, resume_run=True)
    assert hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest() == digest


def test_nonfinite_skip_mode_counts_and_continues(tmp_path, image_dir, monkeypatch):
    out = tmp_path / "skip"
    _NaNAt(monkeypatch, 1)
    cfg = tiny_cfg(
        out,
        image_dir,
        **{"run.on_nonfinite": "skip", "run.jacobian_every_epochs": 2, "run.jacobian_tokens": 4},
    )
    result = train(cfg)
    assert result.nonfinite_skipped == 1 and result.step == 8 and len(result.losses) == 7
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert torch.isfinite(ckpt["dino_loss"]["center"]).all()
    assert all(torch.isfinite(v).all() for v in ckpt["teacher"].values())
    assert 1 not in [r["step"] for r in read_jsonl(out / "log.jsonl")]
    # condition numbers of the teacher's attention maps after epoch 2 (paper App. A.7)
    jac = read_jsonl(out / "jacobian.jsonl")
    assert [r["epoch"] for r in jac] and {r["epoch"] for r in jac} == {2}
    assert all(r["kappa"] >= 1 for r in jac)


def test_empty_data_folder_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        main([f"data.path={tmp_path / 'empty'}", f"--out={tmp_path / 'o'}", "model.arch=vit_mini"])


def test_sampler_shards_are_the_single_process_batches():
    """2 ranks with batch B/2 see exactly the images of 1 process with batch B, every step."""
    single = EpochSampler(20, 1, 0, seed=3)
    ranks = [EpochSampler(20, 2, r, seed=3) for r in range(2)]
    for epoch in range(2):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        one = [i for _, i in single]
        two = [[i for _, i in s] for s in ranks]
        for step in range(5):
            got = set(two[0][step * 2 : step * 2 + 2]) | set(two[1][step * 2 : step * 2 + 2])
            assert got == set(one[step * 4 : step * 4 + 4])
        # same permutation as torch's DistributedSampler
        ref = torch.utils.data.DistributedSampler(range(20), num_replicas=2, rank=1, seed=3)
        ref.set_epoch(epoch)
        assert two[1] == list(ref)
    single.set_epoch(1, skip=8)
    assert [i for _, i in single] == one[8:]


def test_augmentation_depends_only_on_seed_epoch_index(image_dir):

    aug = MultiCropAugmentation(AugConfig(global_size=32, local_size=16, n_local=2))
    ds = SeededMultiCrop(ImageFolderDataset(image_dir), aug, seed=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ds[(1, 5)]
    torch.rand(7)  # global RNG use in between must not matter
    b = ds[(1, 5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(ds[(2, 5)][0], a[0])  # another epoch: other crops
    torch.manual_seed(123)
    ds[(0, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched


def test_cli_config_written(full_run):
    out, _ = full_run
    saved = (out / "config.yaml").read_text()
    assert "vit_mini" in saved and json.loads((out / "backbone.json").read_text())["depth"] == 2


# ------------------------------------------------------------ resume overrides (issue 33)


def test_resume_refuses_overrides_that_change_the_trajectory(full_run, image_dir):
    """Issue 33, point 7: ``--resume optim.lr=0.5`` rewrote the stored config for the whole run
    although its first steps used 0.02. Recipe keys are refused and named, through the CLI and
    through a --config-built run alike; logging keys may change."""
    out, _ = full_run
    before = (out / "config.yaml").read_text()
    argv = ["--out", str(out), "--resume", "optim.lr=0.5", "dino.teacher_temp=0.05"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "run.log_every=2"])
    msg = str(e.value)
    assert "optim.lr: checkpoint 0.02 vs this run 0.5" in msg
    assert "dino.teacher_temp: checkpoint 0.07 vs this run 0.05" in msg
    assert "run.log_every:" not in msg  # allowed, so not among the differences
    assert (out / "config.yaml").read_text() == before
    with pytest.raises(ResumeError, match="run.seed: checkpoint 0 vs this run 1"):
        train(tiny_cfg(out, image_dir, **{"run.seed": 1}), resume_run=True)


def test_resume_extends_epochs_against_the_runs_own_config(full_run, tmp_path):
    """``--resume optim.epochs=3`` was validated against the defaults (10 warm-up epochs > 3) and
    refused; the run's own config has one warm-up epoch, so it is an extension."""
    src, _ = full_run
    out = tmp_path / "longer"
    shutil.copytree(src, out)
    result = main(["--out", str(out), "--resume", "optim.epochs=3", "run.log_every=2"])
    assert result.step == 12 and result.epoch == 3 and not result.stopped_early
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")][-3:] == [7, 9, 11]
    with pytest.raises(SystemExit, match="already done 3 epochs"):
        main(["--out", str(out), "--resume", "optim.epochs=2"])


def test_fresh_run_refuses_an_export_without_checkpoint(tmp_path, image_dir):
    """A folder holding a supervised ceiling's export (backbone.pt, no checkpoint.pt)."""
    out = tmp_path / "sup"
    out.mkdir()
    (out / "backbone.pt").write_bytes(b"an earlier export")
    with pytest.raises(FileExistsError, match="backbone.pt exists"):
        train(tiny_cfg(out, image_dir))
    assert (out / "backbone.pt").read_bytes() == b"an earlier export"
