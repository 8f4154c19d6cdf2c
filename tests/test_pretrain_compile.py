"""``run.compile`` and ``run.compile_step`` train without recompiling (issue 32, point 6).

The student and the no-grad teacher used to be two ``torch.compile``d modules sharing
``MultiCropWrapper.forward``'s code object, so the teacher's first call recompiled it; now the
teacher is compiled through a function of its own. With ``run.compile_step`` the forward and the
loss are one graph, and the teacher temperature is a tensor so a new epoch does not recompile it.
Recompiles are decided by dynamo's guards before a backend sees the graph, so the runs use the
``aot_eager`` backend (the same graphs without code generation: seconds instead of minutes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PRETRAIN, tiny_pretrain_config

from dino_skipless.dino.runlog import read_jsonl
from dino_skipless.dino.trainer import train

REPO = Path(__file__).resolve().parents[1]
# 2 epochs of 4 steps; the teacher temperature changes at the epoch (a 2-epoch warm-up)
RUN = {**TINY_PRETRAIN, "model.variant": "skip", "run.keep_epochs": []}
RUN |= {"dino.warmup_teacher_temp_epochs": 2, "run.compile_backend": "aot_eager"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["run.compile", "run.compile_step"])
def test_compiled_training_never_recompiles(tmp_path, image_dir, mode):
    overrides = {**RUN, "data.path": str(image_dir), mode: True, "run.out": str(tmp_path / "c")}
    env = {**os.environ, "TORCH_LOGS": "recompiles", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "dino_skipless.pretrain"]
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Recompiling" not in proc.stderr, proc.stderr[-3000:]
    compiled = [r["loss"] for r in read_jsonl(tmp_path / "c" / "log.jsonl")]
    eager = train(tiny_pretrain_config(tmp_path / "e", image_dir, RUN)).losses
    assert len(compiled) == 8
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)
