"""The supervised replication (dino_skipless/replication/supervised.py, scripts/
replicate_supervised.py): Table 1 by seed, the loss threshold and steps to it by hand, the
claims' verdicts following constructed numbers, and the --quick pipeline end to end."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dino_skipless.replication import supervised as sup

REPO = Path(__file__).resolve().parents[1]


def fake(variant, opt, seed, top1, loss):
    steps = np.arange(1, len(loss) + 1)
    return sup.Run(variant, opt, seed, top1, None, steps, np.asarray(loss, float), 10.0, 8.0)


def table_runs(top1: dict, noise=(0.0, 0.4, -0.4)):
    """Three seeds of every model; top-1 = the model's value + a per-seed offset shared by all
    models of that seed (the seed's data order), losses falling linearly."""
    return [
        fake(v, o, s, t + noise[s], np.linspace(2.0, 1.0 + 0.01 * (100 - t), 20))
        for (v, o), t in top1.items()
        for s in range(3)
    ]


PAPERLIKE = {
    ("skip", "adamw"): 80.3, ("skip", "soap"): 80.1, ("skipless", "adamw"): 61.4,
    ("skipless", "soap"): 77.0, ("skipless_init", "adamw"): 78.1, ("skipless_init", "soap"): 80.8,
}  # fmt: skip


def test_table1_is_the_seed_mean_and_se():
    runs = table_runs(PAPERLIKE, noise=(0.0, 1.0, 2.0))
    t = sup.table1(runs)["skip/adamw"]
    assert t["mean"] == pytest.approx(81.3) and t["sd"] == pytest.approx(1.0)
    assert t["se"] == pytest.approx(1.0 / np.sqrt(3)) and t["n"] == 3


def test_threshold_and_steps_to_it_by_hand():
    runs = [
        fake("skip", "adamw", 0, 50, [3, 2.5, 2, 1.5, 1, 0.8]),
        fake("skip", "adamw", 1, 50, [3, 2.4, 2.2, 1.3, 1, 0.8]),
        fake("skipless", "adamw", 0, 40, [3, 3, 3, 2.5, 2.1, 2.0]),
        fake("skipless", "adamw", 1, 40, [3, 2.9, 2.8, 2.7, 2.6, 2.5]),
    ]
    # skip + AdamW at half of its 6 steps (step 3): 2.0 and 2.2 -> threshold 2.1
    assert sup.threshold(runs) == pytest.approx(2.1)
    lt = sup.loss_table(runs)
    assert lt["models"]["skip/adamw"]["steps_to_threshold"]["values"] == [3, 4]
    # skipless: seed 0 reaches 2.1 at step 5; seed 1 never (counted as its last step, 6)
    assert lt["models"]["skipless/adamw"]["steps_to_threshold"]["values"] == [5, 6]
    assert lt["models"]["skipless/adamw"]["never"] == 1
    assert lt["models"]["skipless/adamw"]["loss_at_1"]["values"] == [2.0, 2.5]


def test_claims_follow_the_paper_numbers():
    by = {c["claim"]: c for c in sup.claims(table_runs(PAPERLIKE))}
    assert by["removing the skips hurts with AdamW"]["verdict"] == "shown"
    soap = by["SOAP recovers much of it (more than half of the AdamW gap)"]
    assert soap["verdict"] == "shown" and soap["share"] == pytest.approx(15.6 / 18.9)
    init = by["the init recovers most of it (more than half of the AdamW gap)"]
    assert init["share"] == pytest.approx(16.7 / 18.9)
    # 80.8 vs 80.1, the same seed offsets: a constant +0.7 per seed, so significant
    assert by["init + SOAP matches or beats skip"]["verdict"] == "shown (beats)"


def test_claims_fail_when_the_numbers_say_otherwise():
    rev = dict(PAPERLIKE)
    rev[("skipless_init", "adamw")] = 65.0  # recovers 3.6 of 18.9: less than half
    rev[("skipless_init", "soap")] = 70.0  # 10 points below skip
    rng = np.random.default_rng(0)
    runs = table_runs(rev)
    for r in runs:  # independent evaluation noise per run as well
        r.top1 += float(rng.normal(0, 0.3))
    by = {c["claim"]: c for c in sup.claims(runs)}
    assert by["the init recovers most of it (more than half of the AdamW gap)"]["verdict"] == (
        "not shown"
    )
    assert by["init + SOAP matches or beats skip"]["verdict"] == "not shown"
    # within noise: equal means, noisy seeds
    same = {k: 70.0 for k in PAPERLIKE}
    runs = table_runs(same)
    for r in runs:
        r.top1 += float(rng.normal(0, 2.0))
    c = {c["claim"]: c for c in sup.claims(runs)}["init + SOAP matches or beats skip"]
    assert c["verdict"].startswith("within noise")


def test_missing_runs_are_untested_not_guessed():
    runs = [r for r in table_runs(PAPERLIKE) if r.variant != "skipless"]
    verdicts = [c["verdict"] for c in sup.claims(runs)]
    assert verdicts[:3] == ["untested (runs missing)"] * 3


def test_quick_pipeline_trains_reuses_and_writes_the_page(tmp_path, monkeypatch):
    """--quick on the photos world (the --data path), two runs; then the page again from the
    finished runs without training."""
    monkeypatch.chdir(REPO)
    spec = importlib.util.spec_from_file_location("rs", REPO / "scripts/replicate_supervised.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--quick", "--seeds", "1", "--worlds", "photos", "--variants", "skip",
            "skipless_init", "--optimizers", "adamw", "--out", str(tmp_path)]  # fmt: skip
    res = mod.main(argv)
    runs = res["worlds"]["photos"]["runs"]
    assert set(runs) == {"skip_adamw_seed0", "skipless_init_adamw_seed0"}
    for name, r in runs.items():
        summary = json.loads((tmp_path / "runs/photos" / name / "summary.json").read_text())
        assert r["top1"] == summary["top1"] and summary["finished"]
    page = (tmp_path / "RESULTS.md").read_text()
    assert "## World: photos" in page and "| skip | " in page and "[80.3]" in page
    assert (tmp_path / "fig1_photos.png").stat().st_size > 0
    again = mod.main([*argv, "--only-finished"])
    assert again["worlds"]["photos"]["runs"] == runs and not again["missing"]
    # a clone has the runs' logs but not their weights: the page still comes from the logs
    for w in tmp_path.glob("runs/photos/*/**/*.pt"):
        w.unlink()
    cloned = mod.main([*argv, "--only-finished"])
    assert cloned["worlds"]["photos"]["runs"] == runs and not cloned["missing"]
    # a finished run is not reused under another recipe
    with pytest.raises(SystemExit, match="another recipe"):
        mod.main([*argv, "optim.lr=0.5"])
