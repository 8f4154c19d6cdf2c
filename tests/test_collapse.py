"""Collapse alarm: the pure streak logic by hand, and runs that collapse on purpose."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_PRETRAIN, tiny_pretrain_config

from dino_skipless.dino.collapse import CollapseError, CollapseMonitor, target_information
from dino_skipless.dino.config import ConfigError, build_config
from dino_skipless.dino.loss import teacher_entropies
from dino_skipless.dino.trainer import train

# The trainer tests' tiny run, at the default lr, with a short collapse window.
TINY = {k: v for k, v in TINY_PRETRAIN.items() if k != "optim.lr"} | {
    "dino.out_dim": 64,
    "optim.warmup_epochs": 0,
    "run.keep_epochs": [],
    "run.collapse_window": 3,
}


def test_information_is_mutual_information_of_the_target():
    # Two images, K=2: one-hot on different classes = ln 2 nats about the image; the same
    # one-hot for both = 0; uniform for both = 0.
    def info(p):
        p = torch.tensor(p, dtype=torch.float64)
        h = -(p * p.clamp_min(1e-30).log()).sum(1).mean()
        m = p.mean(0)
        hb = -(m * m.clamp_min(1e-30).log()).sum()
        return target_information(float(h), float(hb))

    assert info([[1, 0], [0, 1]]) == pytest.approx(math.log(2))
    assert info([[1, 0], [1, 0]]) == pytest.approx(0)
    assert info([[0.5, 0.5], [0.5, 0.5]]) == pytest.approx(0)


def test_teacher_entropies_feed_the_information():
    # The loss module's entropies of a target that ignores the image give ~0 information.
    t = torch.zeros(8, 16)
    h, hb = teacher_entropies(t, torch.zeros(1, 16), 0.04)
    assert h == pytest.approx(math.log(16), abs=1e-5) and hb == pytest.approx(math.log(16), 1e-5)
    assert target_information(h, hb) == pytest.approx(0, abs=1e-5)
    t = torch.eye(8, 16) * 10  # each image peaked on its own class
    h, hb = teacher_entropies(t, torch.zeros(1, 16), 0.04)
    assert target_information(h, hb) == pytest.approx(math.log(8), abs=1e-3)


def test_streak_logic_by_hand():
    m = CollapseMonitor(window=3, min_info=0.1)
    fired = [m.update(s, h, hb) for s, (h, hb) in enumerate(
        [(1, 2), (2, 2.05), (2, 2.0), (1, 2), (3, 3), (3, 3), (3, 3.01), (3, 3), (0.5, 2)]
    )]  # fmt: skip
    # steps 1-2 below, 3 breaks it; 4-7 below: fires at step 6 only (third of the streak)
    assert fired == [False, False, False, False, False, False, True, False, False]
    assert m.collapsed_at == 6 and m.collapsed_steps == 2 and not m.collapsed
    assert m.streak == 0
    m.update(9, float("nan"), float("nan"))  # a skipped step neither counts nor resets
    assert m.streak == 0
    state = m.state_dict()
    m2 = CollapseMonitor(3, 0.1)
    m2.load_state_dict(state)
    assert m2.summary() == m.summary()
    assert "DINO COLLAPSE" in m.message(6, 6.5, 6.51, 1024)
    assert "uniform collapse, ~665 of 1024" in m.message(6, 6.5, 6.51, 1024)  # e^6.5 = 665
    assert "one-dimension" in m.message(6, 0.01, 0.02, 1024)
    # the same peaked target for every image (entropy 1.236, measured on digits at T 0.01) is
    # neither uniform (ln 1024 = 6.93) nor one-dimensional: e^1.236 = 3.44 prototypes
    assert "collapse onto ~3.4 of 1024 prototypes" in m.message(6, 1.236, 1.237, 1024)


def test_message_names_the_remedy_as_overrides_that_exist():
    """The alarm's advice must be a runnable remedy: every ``key=value`` it names is a valid
    override of the pretraining config (a renamed key would otherwise advise nothing)."""
    import re

    msg = CollapseMonitor(3, 0.1).message(6, 3.0, 3.01, 1024)
    overrides = dict(kv.split("=", 1) for kv in re.findall(r"\b(dino\.[a-z_]+=[\w.]+)", msg))
    assert overrides == {"dino.koleo_weight": "0.1", "dino.centering": "sinkhorn_knopp",
                         "dino.teacher_temp": "0.01", "dino.warmup_teacher_temp": "0.01"}  # fmt: skip
    cfg = build_config(None, overrides)
    cfg.validate()
    assert cfg.dino.koleo_weight == 0.1 and cfg.dino.centering == "sinkhorn_knopp"
    assert cfg.dino.teacher_temp == cfg.dino.warmup_teacher_temp == 0.01


def test_window_zero_never_fires_and_bad_config_is_refused(tmp_path):
    m = CollapseMonitor(window=0, min_info=0.1)
    assert not m.collapsed
    with pytest.raises(ConfigError, match="on_collapse"):
        build_config(None, {"run.on_collapse": "panic"}).validate()
    with pytest.raises(ConfigError, match="collapse_window"):
        build_config(None, {"run.collapse_window": -1}).validate()


def _cfg(out, data, **extra):
    return tiny_pretrain_config(out, data, base=TINY, **extra)


# A very soft teacher (T = 10) makes the centred target uniform from the first step: the
# uniform collapse on purpose. (Learning runs that stay clear of the alarm: README, "Does the
# trainer learn?", results/learn_cpu/curves.png.)
COLLAPSING = {"dino.teacher_temp": 10.0, "dino.warmup_teacher_temp": 10.0}


@pytest.mark.usefixtures("one_thread")
def test_collapsing_run_warns_in_log_summary_and_records(tmp_path, image_dir, capsys):
    res = train(_cfg(tmp_path / "c", image_dir, **COLLAPSING))
    assert res.collapse["collapsed"] and res.collapse["collapsed_at_step"] == 2
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["collapse"]["collapsed"] and summary["collapse"]["collapsed_at_end"]
    log_txt = (tmp_path / "c" / "log.txt").read_text()
    assert "DINO COLLAPSE at step 2" in log_txt and "THIS RUN COLLAPSED" in log_txt
    assert "teacher_temp" in log_txt  # says what to try
    assert "uniform collapse" in log_txt  # T = 10: flat over the head's out_dim prototypes
    recs = [json.loads(x) for x in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert all(r["teacher_info"] < 0.05 for r in recs)
    assert [r["collapsed"] for r in recs][:4] == [False, False, True, True]


def test_on_collapse_stop_is_an_error_naming_the_step(tmp_path, image_dir):
    with pytest.raises(CollapseError, match=r"step 2.*No checkpoint was written yet"):
        train(_cfg(tmp_path / "s", image_dir, **COLLAPSING, **{"run.on_collapse": "stop"}))
    assert "DINO COLLAPSE" in (tmp_path / "s" / "log.txt").read_text()
