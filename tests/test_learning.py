"""Does the trainer teach anything? (issue 17, point 6)

A short run of the CPU recipe (``configs/quickstart_cpu.yaml`` shrunk to 4 blocks and
32/16 px crops: 930 DINO steps, 151 s on 2 idle cores with the k-NN) must beat its own
initialisation (``RUN/init``, exported before step 0) on the k-NN of the pattern world, image
by image (``paired_knn``: exact McNemar test on 1,998 held-out images).

A trainer that does not learn cannot pass: a teacher that never updates or a student whose
optimizer never steps leaves the exported backbone equal to ``RUN/init`` (difference exactly 0). To see the
test fail, break the trainer on purpose:

    SKIPLESS_BREAK_TRAINER=frozen_teacher python -m pytest tests/test_learning.py
    SKIPLESS_BREAK_TRAINER=no_student_grad python -m pytest tests/test_learning.py

A loss without centring (``no_centring``) is *not* caught here, because it is not a trainer
that fails to learn at this length: 620 steps without it gained +6.0 ± 1.0 k-NN points, with a
final loss of 0.016 (the teacher's targets turned one-hot per image) instead of ~6. The centring
itself is tested in ``test_dino_loss.py`` (``test_forward_uses_old_center_then_updates_it``).
"""

import json
import os
from pathlib import Path

import pytest

from dino_skipless.dino.config import build_config
from dino_skipless.dino.trainer import train
from eval.knn import main as knn_main
from eval.knn import paired_knn

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quickstart_cpu.yaml"
# 930 steps of batch 32; depth, crops and epochs are the only changes to the recipe (the online
# monitor is off: this test scores with eval.knn, whose numbers its bars were measured with)
SHORT = {
    "model.variant": "skip",
    "model.depth": 4,
    "aug.global_size": 32,
    "aug.local_size": 16,
    "optim.epochs": 30,
    "monitor.knn_every": 0,
    "run.progress": False,
    "run.tensorboard": False,
}
# the replication's k-NN world (held-out seed) at the training crops' 32 px; 10,000 images give
# 2,000 validation images, one s.e. of the paired difference ~1 point
KNN = ["--dataset", "synthetic", "--synthetic-n", "10000", "--synthetic-size", "96",
       "--resize", "32", "--crop", "32", "--synthetic-seed", "1"]  # fmt: skip
# Measured on 2 idle cores (k-NN gain over the run's own init, 1,998 validation images), seeds
# 0, 1, 2: +5.96 (z 5.1), +7.01 (z 6.4), +6.86 (z 6.1); at 20 epochs only +2.75, +3.90, +4.50,
# too close to any bar to be stable across machines. A trainer that learns nothing gets 0 or
# less; the issue's bar of 3 s.e. (and 3 points) leaves the weakest seed 3 points of room.
MIN_GAIN = 3.0
MIN_Z = 3.0


def _break_trainer(monkeypatch, how: str) -> None:
    """The deliberate faults of the module docstring (for showing that the test can fail)."""
    from dino_skipless.dino import loss, trainer

    if how == "frozen_teacher":
        monkeypatch.setattr(trainer, "ema_update_", lambda teacher, student, m: None)
    elif how == "no_centring":
        monkeypatch.setattr(loss.DINOLoss, "update_center", lambda self, teacher_out: None)
    elif how == "no_student_grad":
        orig = trainer.build_optimizer

        def frozen(*args, **kwargs):
            opt = orig(*args, **kwargs)
            opt.step = lambda *a, **k: None
            return opt

        monkeypatch.setattr(trainer, "build_optimizer", frozen)
    else:
        raise ValueError(
            f"SKIPLESS_BREAK_TRAINER={how!r}: frozen_teacher|no_centring|no_student_grad"
        )


@pytest.mark.slow
def test_short_dino_run_beats_its_own_init_on_knn(tmp_path, monkeypatch):
    if os.environ.get("SKIPLESS_BREAK_TRAINER"):
        _break_trainer(monkeypatch, os.environ["SKIPLESS_BREAK_TRAINER"])
    run = tmp_path / "run"
    train(build_config(RECIPE, {**SHORT, "run.out": str(run)}))
    knn = {}
    for name, ckpt in (("trained", run), ("init", run / "init")):
        out = tmp_path / f"knn_{name}"
        argv = [*KNN, "--ckpt", str(ckpt), "--num-workers", "0", "--out", str(out), "--quiet"]
        assert knn_main(argv) == 0
        knn[name] = json.loads((out / "results.json").read_text())
    p = paired_knn(knn["trained"], knn["init"])
    z = p["diff"] / p["diff_se"] if p["diff_se"] > 0 else 0.0
    assert p["diff"] >= MIN_GAIN and z >= MIN_Z, (
        f"{SHORT['optim.epochs']} epochs of DINO did not beat their own init on k-NN: "
        f"{p['top1_a']:.2f} vs {p['top1_b']:.2f} ({p['diff']:+.2f} ± {p['diff_se']:.2f}, z {z:.1f}; "
        f"needs >= {MIN_GAIN} points at z >= {MIN_Z})"
    )
