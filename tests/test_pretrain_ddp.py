"""torchrun with 2 CPU processes (gloo) and per-process batch B/2 == 1 process with batch B."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smooth_image
from PIL import Image

from dino_skipless.dino.config import build_config
from dino_skipless.dino.runlog import read_jsonl
from dino_skipless.dino.trainer import build_student_teacher, train
from dino_skipless.pretrain import main

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "model.arch=vit_mini",
    # The residual variant: at the paper's init this toy model's attention is saturated
    # (d_h = 64), so its q/k gradients are float noise (~1e-7) that Adam rescales into +-lr
    # steps whose values depend on the reduction order; DDP's code path is the same for every
    # variant, and with "skip" every weight has a real gradient to compare.
    "model.variant=skip",
    "model.depth=2",
    "model.patch_size=8",
    "aug.global_size=32",
    "aug.local_size=16",
    "aug.n_local=2",
    "dino.out_dim=256",
    "dino.momentum_teacher=0.9",  # the teacher must move far above float32 rounding in 8 steps
    "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32",
    "data.num_workers=0",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "optim.lr=0.02",
    "run.precision=fp32",
    "run.log_every=1",
    "run.progress=false",
    "run.tensorboard=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={_free_port()}", "-m", "dino_skipless.pretrain", *args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("augment_on", ["cpu", pytest.param("device", marks=pytest.mark.slow)])
def test_two_gloo_processes_match_one_process(tmp_path, augment_on):
    data = tmp_path / "imgs" / "a"
    data.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(16):
        smooth_image(rng).save(data / f"{i}.png")
    common = [*OVERRIDES, f"data.path={data.parent}", f"data.augment_on={augment_on}"]

    ddp_out = tmp_path / "ddp"
    proc = _torchrun(
        [*common, "data.batch_size_per_gpu=2", "run.device=cpu", f"--out={ddp_out}"], tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x2" in (ddp_out / "log.txt").read_text()  # really ran with world size 2

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = [o.split("=", 1) for o in common]
        cfg = build_config(None, [*overrides, ("data.batch_size_per_gpu", 4)])
        cfg.run.out = str(tmp_path / "single")
        single = train(cfg)
    finally:
        torch.set_num_threads(n)

    ddp_losses = [r["loss"] for r in read_jsonl(ddp_out / "log.jsonl")]
    assert len(ddp_losses) == 8
    np.testing.assert_allclose(ddp_losses, single.losses, rtol=1e-5, atol=1e-6)
    a = torch.load(ddp_out / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=False)
    assert a["meta"]["world_size"] == 2 and b["meta"]["world_size"] == 1
    assert a["meta"]["total_batch"] == b["meta"]["total_batch"] == 4

    fresh, _ = build_student_teacher(cfg)
    init = fresh.state_dict()
    dim = fresh.backbone.embed_dim

    def masked(k, t):
        # The key bias (middle third of qkv.bias) has an exactly-zero gradient (softmax is
        # shift-invariant); Adam turns its float noise into +-lr steps, so it depends on the
        # reduction order in any implementation. Everything else must match.
        return torch.cat([t[:dim], t[2 * dim :]]) if k.endswith("attn.qkv.bias") else t

    for part in ("student", "teacher"):
        err = max((masked(k, a[part][k]) - masked(k, b[part][k])).abs().max().item() for k in init)
        moved = max((b[part][k] - init[k]).abs().max().item() for k in init)
        # not vacuous: the weights moved by 100x more than the two runs differ
        assert err < 1e-2 * moved, (part, err, moved)
    torch.testing.assert_close(
        a["dino_loss"]["center"], b["dino_loss"]["center"], rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("bad", ["data.batch_size_per_gpu=0"])
def test_bad_batch_is_refused(bad, tmp_path):

    with pytest.raises(SystemExit, match=r"data\.batch_size_per_gpu must be >= 1, got 0"):
        main([bad, f"--out={tmp_path}"])


@pytest.mark.slow
def test_bad_image_under_ddp_stops_every_process(tmp_path):
    """The bad image is on one rank's shard; the all-reduced count stops both ranks at the same
    step (no hang in the next collective), each with one line."""
    data = tmp_path / "imgs" / "a"
    data.mkdir(parents=True)
    for i in range(16):
        Image.new("RGB", (40, 40), (15 * i, 90, 200)).save(data / f"{i}.png")
    (data / "7.png").write_bytes(b"garbage")
    args = [*OVERRIDES, f"data.path={data.parent}", "data.batch_size_per_gpu=2"]
    proc = _torchrun([*args, "run.device=cpu", f"--out={tmp_path / 'raise'}"], tmp_path)
    assert proc.returncode != 0
    # one error from each process; the two processes share stderr, so their lines may run
    # into each other: split on the prefix rather than on newlines
    errors = ["error: " + e for e in proc.stderr.split("error: ")[1:]]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert sum(f"corrupt or truncated image {data / '7.png'}" in e for e in errors) == 1
    assert sum("on another process" in e for e in errors) == 1
