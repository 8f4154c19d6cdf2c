"""The online k-NN monitor (``dino/monitor.py``) and the calibrated teacher temperature
(``dino/calibrate.py``), on tiny runs."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_PRETRAIN, tiny_pretrain_config, write_image_folder
from PIL import Image

from dino_skipless.data import ImageFolderDataset
from dino_skipless.dino.calibrate import SCALES, information_curve, pick_scale
from dino_skipless.dino.monitor import (
    holdout_split,
    learned_verdict,
    monitor_sets,
    split_per_class,
    verdict_line,
)
from dino_skipless.dino.runlog import read_jsonl
from dino_skipless.dino.trainer import train
from dino_skipless.models.loading import load_backbone
from dino_skipless.pretrain import main
from dino_skipless.stats import paired_hits
from eval.knn_lib import KNNConfig, eval_transform, knn_scores

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 classes of 24 images: a quarter of each (6) held out as queries, evaluated every epoch
MONITORED = {**TINY_PRETRAIN, "monitor.knn_every": 1, "monitor.knn_holdout_fraction": 0.25}


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("labelled"), seed=3, n=48)


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory, labelled_dir):
    out = tmp_path_factory.mktemp("mon") / "run"
    res = train(tiny_pretrain_config(out, labelled_dir, MONITORED))
    return out, res


def test_split_per_class_is_seeded_disjoint_and_capped():
    targets = [0] * 10 + [1] * 30 + [2] * 3
    first, rest = split_per_class(targets, 12, seed=5, max_fraction=0.5)
    assert sorted(first + rest) == list(range(len(targets))) and not set(first) & set(rest)
    per = np.bincount(np.asarray(targets)[first], minlength=3)
    assert per.tolist() == [4, 4, 1]  # ceil(12 / 3) = 4, but at most half of class 2 (3 -> 1)
    assert split_per_class(targets, 12, seed=5, max_fraction=0.5) == (first, rest)
    assert split_per_class(targets, 12, seed=6, max_fraction=0.5) != (first, rest)
    # never a whole class
    assert len(split_per_class([0, 0, 1, 1], 100, seed=0)[0]) == 2


def test_monitor_records_init_epochs_and_verdict(monitored_run, labelled_dir):
    out, res = monitored_run
    recs = read_jsonl(out / "knn.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1, 2] and recs[0]["step"] == 0
    assert recs[-1]["step"] == res.step
    # the queries were held out of pretraining: 25 % of each class of 24 = 6 each, 12 in all
    assert {r["knn_n_query"] for r in recs} == {12}
    assert res.step == 2 * ((48 - 12) // 4)
    summary = json.loads((out / "summary.json").read_text())
    v = summary["knn_monitor"]
    ref = paired_hits([c == "1" for c in recs[-1]["knn_hits"]],
                      [c == "1" for c in recs[0]["knn_hits"]])  # fmt: skip
    assert v["diff"] == pytest.approx(ref["diff"]) and v["p"] == pytest.approx(ref["p_value"])
    assert v["learned"] == (v["z"] is not None and v["z"] >= 3)
    line = verdict_line(v)
    assert line.startswith(f"k-NN {v['final_top1']:.1f} vs {v['init_top1']:.1f} at init")
    assert line in (out / "log.txt").read_text()  # the run's last word


def test_monitor_scores_like_eval_knn(monitored_run, labelled_dir):
    """The first evaluation == DINO's k-NN (eval.knn's transform and vote) of RUN/init."""
    out, _ = monitored_run
    cfg = tiny_pretrain_config(out, labelled_dir, MONITORED)
    base = ImageFolderDataset(labelled_dir)
    held = holdout_split(cfg, base)
    sets = monitor_sets(cfg, base, held)
    model = load_backbone(out / "init")[0].eval()
    tf = eval_transform(KNNConfig(resize=32, crop=32))

    def feats(items):
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in items])
        with torch.no_grad():
            return F.normalize(model(x), dim=1), torch.tensor([y for _, y in items])

    bf, by = feats(sets.bank)
    qf, qy = feats(sets.queries)
    hits = (knn_scores(bf, by, qf, 20, 0.07, 2, "torch").argmax(1) == qy).tolist()
    first = read_jsonl(out / "knn.jsonl")[0]
    # the monitor decodes and resizes itself (uint8 cache): the same hits up to rounding
    agree = np.mean([h == (c == "1") for h, c in zip(hits, first["knn_hits"])])
    assert agree >= 11 / 12


def test_monitor_leaves_the_training_unchanged(tmp_path, labelled_dir, monitored_run):
    """The monitor reads the teacher and never the RNG: the same losses with it off, on the
    same (held-out-reduced) training images."""
    _, res = monitored_run
    # without the monitor nothing is held out: keep the comparison on the same images
    base = ImageFolderDataset(labelled_dir)
    keep = holdout_split(tiny_pretrain_config(tmp_path / "x", labelled_dir, MONITORED), base)[1]
    sub = tmp_path / "kept"
    for i in keep:
        p = base.samples[i][0]
        (sub / p.parent.name).mkdir(parents=True, exist_ok=True)
        (sub / p.parent.name / p.name).write_bytes(p.read_bytes())
    off = tiny_pretrain_config(tmp_path / "off", sub, MONITORED, **{"monitor.knn_every": 0})
    assert train(off).losses == res.losses


def test_monitor_is_skipped_without_enough_labelled_images(tmp_path, image_dir):
    # 8 images per class: 10 % holds out none, so there is nothing to score
    res = train(tiny_pretrain_config(tmp_path / "r", image_dir, **{"monitor.knn_every": 1}))
    assert not (tmp_path / "r" / "knn.jsonl").exists() and res.step == 8
    assert "k-NN monitor: skipped" in (tmp_path / "r" / "log.txt").read_text()


def test_val_sibling_gives_the_queries(tmp_path):
    write_image_folder(tmp_path / "d" / "train", seed=1, n=16)
    write_image_folder(tmp_path / "d" / "val", seed=2, n=12)
    cfg = tiny_pretrain_config(tmp_path / "r", tmp_path / "d" / "train", MONITORED)
    train_ds = ImageFolderDataset(tmp_path / "d" / "train")
    assert holdout_split(cfg, train_ds) is None  # nothing taken out of pretraining
    sets = monitor_sets(cfg, train_ds, None)
    assert len(sets.queries) == 12 and len(sets.bank) == 16
    assert all("val" in str(p) for p, _ in sets.queries)


def test_learned_verdict_threshold():
    init = {"knn_hits": "0" * 50 + "1" * 50}
    better = {"knn_hits": "1" * 40 + "0" * 10 + "1" * 50}
    v = learned_verdict(init, better)
    assert (
        v["diff"] == pytest.approx(40.0) and v["learned"] and "the run learned" in verdict_line(v)
    )
    v = learned_verdict(init, {"knn_hits": "1" + "0" * 49 + "1" * 50})
    assert not v["learned"] and "NOT measurably better" in verdict_line(v)


# ---------------------------------------------------------------------- calibrated temperature


def test_information_rises_as_the_teacher_sharpens():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(16, 64, generator=g) * 0.02 for _ in range(3)]
    curve = information_curve(logits, 0.04, "centering")
    assert all(b >= a - 1e-6 for a, b in zip(curve, curve[1:]))  # sharper -> more information
    assert curve[-1] <= np.log(16) + 1e-6  # at most ln(batch)
    same = [torch.ones(16, 64)]  # every image alike: no information at any temperature
    assert max(information_curve(same, 0.04, "centering")) == pytest.approx(0.0, abs=1e-5)
    f, before, after = pick_scale(curve, curve[5])
    assert f == SCALES[5] and before == curve[0] and after == curve[5]
    assert pick_scale(curve, 0.0)[0] == 1.0  # already informative: unchanged
    assert pick_scale(curve, 1e9)[0] == SCALES[-1]


def test_calibration_changes_nothing_but_the_temperature(tmp_path, image_dir):
    """A target already met keeps the run bit for bit (the calibration's crops restore every
    RNG); an unmet one scales the schedule, logs it and survives a resume."""
    ref = train(tiny_pretrain_config(tmp_path / "ref", image_dir))
    kept = train(tiny_pretrain_config(tmp_path / "kept", image_dir,
                                      **{"dino.teacher_temp_min_info": 0.0}))  # fmt: skip
    assert kept.losses == ref.losses
    hot = {"dino.teacher_temp_min_info": 50.0}  # unreachable: the smallest factor
    full = train(tiny_pretrain_config(tmp_path / "full", image_dir, **hot))
    assert full.losses != ref.losses
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["teacher_temp_scale"] == SCALES[-1]
    assert "teacher temperature calibrated" in (tmp_path / "full" / "log.txt").read_text()
    part = tmp_path / "part"
    train(tiny_pretrain_config(part, image_dir, **hot, **{"run.max_steps": 3}))
    second = main(["--out", str(part), "--resume"])
    assert second.losses == full.losses[3:]


def test_remedies_train_end_to_end(tmp_path, image_dir):
    """Sinkhorn-Knopp targets and the KoLeo term through the trainer: finite, and not the
    published run's losses (each changes the objective)."""
    ref = train(tiny_pretrain_config(tmp_path / "ref", image_dir)).losses
    sk = train(tiny_pretrain_config(tmp_path / "sk", image_dir,
                                    **{"dino.centering": "sinkhorn_knopp"})).losses  # fmt: skip
    ko = train(tiny_pretrain_config(tmp_path / "ko", image_dir,
                                    **{"dino.koleo_weight": 0.1})).losses  # fmt: skip
    kb = train(tiny_pretrain_config(tmp_path / "kb", image_dir, **{
        "dino.koleo_weight": 0.1, "dino.koleo_features": "bottleneck"})).losses  # fmt: skip
    for losses in (sk, ko, kb):
        assert len(losses) == len(ref) and all(np.isfinite(losses)) and losses != ref
    assert kb != ko  # the term spreads another feature
    # the first step's KoLeo term is added to the same DINO loss (same weights, same crops)
    assert ko[0] > ref[0]


def test_a_collapsed_run_did_not_learn_whatever_the_knn_says():
    init = {"knn_hits": "0" * 50 + "1" * 50}
    better = {"knn_hits": "1" * 40 + "0" * 10 + "1" * 50}
    v = learned_verdict(init, better, collapsed_since=134)
    assert v["beats_init"] and not v["learned"]
    assert "did NOT learn: the run sits collapsed since step 134" in verdict_line(v)
