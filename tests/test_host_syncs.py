"""A training step never waits for the device except on logging steps (issue 32, point 4).

``dino_skipless.dino.hostsync`` counts, per step, the calls that would make the host wait on a
GPU (``item``, ``float``/``int``/``bool`` of a tensor, ``tolist``, ``cpu``, tensors created from
Python data on the device); on the CPU none of them waits, so counting them is how a CPU test
sees a GPU's stalls."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRETRAIN, tiny_pretrain_config

from dino_skipless.dino.hostsync import HostSyncCounter, count_train_syncs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
# 2 epochs x 4 steps, logged every 3rd step and at each epoch's end: steps 2, 3, 5, 7
RUN = {**TINY_PRETRAIN, "model.variant": "skip", "run.keep_epochs": [], "run.log_every": 3}


def test_counter_sees_each_kind_of_wait():
    x = torch.ones(3)
    with HostSyncCounter() as c:
        c.next_step()
        float(x.sum())
        x.tolist()
        if x.any():
            torch.tensor([1.0], device="cpu")
        with c.paused():
            x.sum().item()
        torch.tensor([1.0])  # a host tensor: no copy to a device
    assert c.calls[0] == [
        "Tensor.__float__",
        "Tensor.tolist",
        "Tensor.__bool__",
        "torch.tensor(device=...)",
    ]
    assert torch.Tensor.item.__qualname__ == "TensorBase.item"  # unpatched after the block


@pytest.mark.parametrize("augment_on", ["device", "cpu"])
def test_no_step_waits_for_the_device_except_logging_steps(tmp_path, image_dir, augment_on):
    cfg = tiny_pretrain_config(tmp_path / "run", image_dir, RUN, **{"data.augment_on": augment_on})
    steps = count_train_syncs(cfg)
    assert [s["step"] for s in steps if s["logged"]] == [2, 3, 5, 7]
    waits = {s["step"]: s["calls"] for s in steps if not s["logged"] and s["syncs"]}
    assert len(steps) == 8 and not waits, waits
    # not vacuous: the logging steps read the pending values back (and the grad norm)
    assert all(s["syncs"] > 0 for s in steps if s["logged"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_no_step_waits_under_two_gloo_processes(tmp_path, image_dir):
    """The same under torchrun with 2 processes: the loss, entropies and bad-image counts are
    all-reduced on logging steps only."""
    out = tmp_path / "syncs.json"
    overrides = {**RUN, "data.path": str(image_dir), "run.out": str(tmp_path / "run")}
    overrides |= {"data.batch_size_per_gpu": 2, "run.device": "cpu"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={_free_port()}", "-m", "dino_skipless.dino.hostsync", "--out", str(out)]
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        steps = json.loads((tmp_path / f"syncs.rank{rank}.json").read_text())
        assert len(steps) == 8
        waits = {
            s["step"]: s["calls"] for s in steps if s["step"] not in (2, 3, 5, 7) and s["syncs"]
        }
        assert not waits, (rank, waits)
        assert all(s["syncs"] > 0 for s in steps if s["step"] in (2, 3, 5, 7))
