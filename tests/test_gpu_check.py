"""``scripts/gpu_check.py --device cpu --tiny``: every check of the one-command GPU validation
runs and passes on a CPU with a tiny model (issue 32, point 9), so the script cannot rot before a
GPU runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKS = {"versions", "augmentation", "sdpa", "syncs", "loader", "precision", "torchrun"}
CHECKS |= {"tokencut", "throughput"}


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_a_cpu(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads((out / "gpu_check.json").read_text())
    checks = record["checks"]
    assert set(checks) == CHECKS and all(c["ok"] for c in checks.values()), checks
    assert "| augmentation | ok |" in (out / "gpu_check.md").read_text()
    # the figures the GPU run is for are there, with the values a CPU must give
    assert checks["augmentation"]["device_vs_cpu_plan"]["max"] == 0.0  # same device, same plan
    assert checks["syncs"]["max_syncs_non_logging_step"] == 0
    assert checks["tokencut"]["identical_boxes"] == checks["tokencut"]["images"]
    assert checks["torchrun"]["steps_logged"] == 2
    modes = {(r["batch"], r["mode"]) for r in checks["throughput"]["rows"]}
    assert modes == {(b, m) for b in (8, 16) for m in ("ours", "official", "ours+compile")}
    assert all(
        r["loop_img_per_s"] > 0 for r in checks["throughput"]["rows"] if r["mode"] != "official"
    )
    assert checks["precision"]["teacher_target_max_rel_vs_fp32"]["tf32_false"] <= 1e-3
