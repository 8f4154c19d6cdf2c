"""Fig. 1 as a command: grouping by optimiser and variant, the seeds' mean and band by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from dino_skipless.classifier.curves import CurvesError, mean_band, read_run, smooth
from dino_skipless.loss_curves import main


def fake_run(root, variant, opt, seed, losses, spe=2, log_every=1):
    d = root / f"{variant}_{opt}_s{seed}"
    d.mkdir(parents=True)
    cfg = {"model": {"variant": variant}, "optim": {"optimizer": opt}, "run": {"seed": seed}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = [
        json.dumps({"step": s, "loss": v, "loss_mean": v})
        for s, v in enumerate(losses)
        if (s + 1) % log_every == 0
    ]
    (d / "log.jsonl").write_text("\n".join(lines) + "\n")
    (d / "summary.json").write_text(json.dumps({"steps_per_epoch": spe}))
    return d


def test_seeds_are_averaged_with_a_standard_error_band(tmp_path):
    seeds = {0: [3.0, 2.0, 1.0, 0.5], 1: [3.2, 2.4, 1.1, 0.7], 2: [2.8, 2.0, 1.5, 0.6]}
    runs = [fake_run(tmp_path, "skip", "adamw", s, v) for s, v in seeds.items()]
    runs += [fake_run(tmp_path, "skipless_init", "soap", 0, [2.0, 1.0, 0.8, 0.7])]
    out = tmp_path / "fig" / "fig1.png"
    assert main([*map(str, runs), "--out", str(out)]) == 0
    drawn = json.loads(out.with_suffix(".json").read_text())
    c = drawn["curves"]["adamw/skip"]
    ys = np.array(list(seeds.values()))
    assert c["seeds"] == [0, 1, 2] and c["x"] == "epoch" and c["steps"] == [1, 2, 3, 4]
    assert c["mean"] == pytest.approx(ys.mean(0))
    # by hand at step 3: values 1.0, 1.1, 1.5 -> mean 1.2, sd 0.2646, s.e. sd / sqrt(3)
    se = math.sqrt(((1.0 - 1.2) ** 2 + (1.1 - 1.2) ** 2 + (1.5 - 1.2) ** 2) / 2) / math.sqrt(3)
    assert c["hi"][2] - c["mean"][2] == pytest.approx(se)
    assert set(drawn["curves"]) == {"adamw/skip", "soap/skipless_init"}
    assert drawn["curves"]["soap/skipless_init"]["lo"] == [2.0, 1.0, 0.8, 0.7]  # one seed
    assert out.stat().st_size > 0 and "adamw/skip | 3 | 4 |" in out.with_suffix(".md").read_text()


def test_range_band_common_steps_and_smoothing(tmp_path):
    a = read_run(fake_run(tmp_path, "skip", "adamw", 0, [4.0, 3.0, 2.0, 1.0]))
    b = read_run(
        fake_run(tmp_path, "skip", "adamw", 1, [5.0, 3.0, 1.0, 0.0, 9.0, 9.0], log_every=2)
    )
    band = mean_band([a, b], "range")
    assert band.steps.tolist() == [2, 4] and band.truncated  # steps both runs logged
    assert band.lo.tolist() == [3.0, 0.0] and band.hi.tolist() == [3.0, 1.0]
    assert smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    # smoothed per run over 2 records first: a [4, 3.5, 2.5, 1.5], b (steps 2, 4, 6) [3, 1.5, 4.5]
    sd = mean_band([a, b], "sd", k=2)
    assert sd.mean.tolist() == pytest.approx([3.25, 1.5])


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d.mkdir(), "no config.yaml"),
        (lambda d: fake_run(d.parent, "skip", "adamw", 0, [1.0]).rename(d), None),
    ],
)
def test_bad_runs_are_one_line(tmp_path, setup, message):
    run = tmp_path / "run"
    setup(run)
    args = [str(run), "--out", str(tmp_path / "f.png")]
    if message is None:  # the same seed twice
        args = [str(run), str(run), "--out", str(tmp_path / "f.png")]
        message = "several runs with seed 0"
    with pytest.raises(SystemExit, match=message):
        main(args)
    with pytest.raises(SystemExit, match="expected a .png or .pdf"):
        main([str(run), "--out", str(tmp_path / "f.svg")])
    with pytest.raises(CurvesError):
        main([str(tmp_path / "nothing"), "--out", str(tmp_path / "f.png"), "--debug"])
