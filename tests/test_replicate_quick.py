"""End-to-end: pretrain -> export -> jacobian -> linprobe -> tokencut -> pca for all three variants."""

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "replicate_small", ROOT / "scripts" / "replicate_small.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_replication_produces_every_result(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SKIPLESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "rep"
    results = _load_script().main(["--quick", "--out", str(out)])

    saved = json.loads((out / "results.json").read_text())
    assert set(saved["runs"]) == {"skip_adamw", "skipless_adamw", "skipless_init_adamw"}
    for name, rec in saved["runs"].items():
        assert math.isfinite(rec["final_loss"]) and rec["final_loss"] > 0, name
        # each number was read back from the stage's own results.json
        lp = json.loads((out / "linprobe" / name / "results.json").read_text())
        assert rec["linprobe_single_miou"] == lp["miou"]
        assert rec["linprobe_multiscale_miou"] == lp["multiscale"]["miou"]
        assert 0 <= rec["tokencut_synthetic"]["corloc"] <= 100
        assert set(rec["kappa_init"]) == set(rec["kappa_end"]) == {"0", "1"}
    # the paper's mechanism, visible even at this size: skipless at default init is singular,
    # the residual variant is well conditioned
    assert max(saved["runs"]["skipless_adamw"]["kappa_init"].values()) > 1e10
    assert max(saved["runs"]["skip_adamw"]["kappa_init"].values()) < 10
    # the floors are each run's own init (RUN/init, the weights before step 0), through the
    # same evaluations
    assert set(saved["baselines"]) == {"skip", "skipless", "skipless_init"}
    for v, rec in saved["baselines"].items():
        kn = json.loads((out / "knn" / f"random_{v}" / "results.json").read_text())
        own_init = out / "runs" / f"{v}_adamw" / "init"
        assert rec["knn_top1"] == kn["top1"]
        assert Path(kn["checkpoint"]).resolve() == own_init.resolve()
        jac = json.loads((out / "jacobian" / f"{v}_adamw" / "init" / "jacobian.json").read_text())
        assert Path(jac["ckpt"]).resolve() == own_init.resolve()  # kappa of the same weights
        assert 0 <= rec["tokencut_synthetic"]["corloc"] <= 100
    page = (out / "RESULTS.md").read_text()
    # the reference points: raw pixels, and the supervised ceilings evaluated like DINO runs
    refs = saved["references"]
    assert set(refs) == {"pixels", "supervised_cls", "supervised_seg"}
    px = json.loads((out / "knn" / "pixels" / "results.json").read_text())
    assert refs["pixels"]["knn_top1"] == px["top1"] and px["checkpoint"] == {"pixels": 16}
    for task in ("cls", "seg"):
        sup = json.loads((out / "runs" / f"supervised_{task}" / "summary.json").read_text())
        assert sup["task"] == task and sup["steps"] == saved["runs"]["skip_adamw"]["steps"]
    ev = saved["evaluations"]
    assert set(ev) == {"knn", "linprobe_single", "linprobe_multiscale", "tokencut_synthetic"}
    assert ev["knn"]["ceiling"]["model"] == "supervised_cls"
    assert ev["linprobe_single"]["ceiling"]["model"] == "supervised_seg"
    assert ev["knn"]["pixels"] == {"value": px["top1"], "se": px["top1_se"]}
    for name, e in ev.items():
        assert set(e["floor"]) == {"skip", "skipless", "skipless_init"}, name
        assert e["floor"]["skip"]["value"] == _value_of(saved["baselines"]["skip"], name)
        for run, r in e["runs"].items():
            assert r["value"] == _value_of(saved["runs"][run], name)
            t = r["vs_floor"]  # the paired test of the run against its own random init
            assert t["diff"] == pytest.approx(r["value"] - e["floor"][r_variant(run)]["value"])
            assert 0 <= t["p"] <= 1
    assert "## Floor, ceiling and what pretraining adds" in page
    # condition numbers were tracked during pretraining (one record per block and epoch)
    jac = (out / "runs" / "skipless_init_adamw" / "jacobian.jsonl").read_text().splitlines()
    assert {json.loads(line)["layer"] for line in jac} == {0, 1}
    assert "## The paper's claims at this scale" in page
    # the hierarchy stage on every run at its own init and after DINO, and on the ceilings
    hier = saved["hierarchy"]
    rows = {(r["variant"], r["when"]) for r in hier["summary"]}
    assert rows == {(v, w) for v in saved["baselines"] for w in ("init", "end")} | {
        ("supervised_cls", "ceiling"),
        ("supervised_seg", "ceiling"),
    }
    stage = json.loads((out / "hierarchy" / "skip_adamw" / "end" / "results.json").read_text())
    skip_end = next(r for r in hier["summary"] if r["variant"] == "skip" and r["when"] == "end")
    assert skip_end["columns"]["adjacent CKA, patch"]["mean"] == pytest.approx(
        stage["models"][0]["cka"]["patch"]["adjacent_mean"]
    )
    # one seed per variant: the claims about variants are untested, and say so
    assert {c["verdict"] for c in hier["claims"]} == {"untested (one seed)"}
    assert len(hier["claims"]) == 4 and "more hierarchical than skip's" in page
    assert len(hier["per_block_knn"]["skip_adamw (end)"]) == 2  # seed 0: k-NN of every block
    # the conditioning claim is decided by the numbers above, and they support it here
    assert "Skipless at the default init is ill-conditioned" in page
    verdicts = re.findall(r"\| \*\*([a-z ]+)\*\* \|", page)
    # 2 conditioning claims, 2 linear-probe claims, TokenCut, 3 pretrained-vs-random checks
    assert len(verdicts) == 8
    assert set(verdicts) <= {"shown", "partly shown", "not shown", "within noise"}
    for fig in ("pca.png", "training_curves.png", "hierarchy.png", "RESULTS.md"):
        assert (out / fig).stat().st_size > 0
    assert results["runs"].keys() == saved["runs"].keys()
    # the probe's bootstrap error bars travel into the page
    assert all(r["linprobe_single_se"] >= 0 for r in saved["runs"].values())

    # rebuilding the page reuses every stage: nothing re-runs, the numbers are the same
    log = out / "logs" / "skip_adamw" / "linprobe.txt"
    before = log.stat().st_mtime_ns
    again = _load_script().main(["--quick", "--out", str(out), "--reuse-evals"])
    assert log.stat().st_mtime_ns == before
    assert again["runs"] == saved["runs"] and again["baselines"] == saved["baselines"]
    # reused stages keep the wall time they took (only the PCA figure is redrawn)
    for key, seconds in saved["timings_s"].items():
        if key != "pca":
            assert again["timings_s"][key] == seconds, key
    # a finished run is not reused under another recipe: the page would mislabel it
    with pytest.raises(SystemExit, match=r"(?s)skip_adamw is a finished run.*optim\.lr"):
        _load_script().main(["--quick", "--out", str(out), "--reuse-evals", "optim.lr=0.5"])
    # --only-finished trains nothing: seed 1's runs are listed as missing, seed 0's page stays
    partial = _load_script().main(
        ["--quick", "--out", str(out), "--reuse-evals", "--seeds", "2", "--only-finished"]
    )
    assert not (out / "runs" / "skip_adamw_seed1").exists()
    assert set(partial["missing"]) == {f"{v}_adamw_seed1" for v in saved["baselines"]} | {
        "supervised_cls_seed1",
        "supervised_seg_seed1",
    }
    assert partial["runs"] == saved["runs"]
    assert "**Not trained yet** (left out of every table): " in (out / "RESULTS.md").read_text()


def _value_of(rec: dict, evaluation: str) -> float:
    key = {"knn": "knn_top1", "linprobe_single": "linprobe_single_miou",
           "linprobe_multiscale": "linprobe_multiscale_miou"}.get(evaluation)  # fmt: skip
    return rec[key] if key else rec[evaluation]["corloc"]


def r_variant(run: str) -> str:
    return run.rsplit("_", 1)[0]


def _run(variant, knn, corloc, miou, kappa_init, kappa_end, n=400):
    return {
        "variant": variant,
        "optimizer": "adamw",
        "knn_top1": knn,
        "knn_n_val": n,
        "linprobe_single_miou": miou,
        "linprobe_multiscale_miou": miou,
        "linprobe_n_val": 50,
        "tokencut_synthetic": {"corloc": corloc, "best_layer": 0, "n_images": n},
        "kappa_init": {"0": kappa_init},
        "kappa_end": {"0": kappa_end},
    }


def test_claim_verdicts_follow_the_numbers_and_their_noise():
    mod = _load_script()
    # binomial s.e. of a difference of two 50% accuracies on 400 items each: 100*sqrt(2*.25/400)
    assert mod.diff_se(50.0, 50.0, 400, 400) == pytest.approx(100 * math.sqrt(0.5 / 400))
    assert mod.compare(30.0, 20.0, 2.0) == "shown"  # 10 points > 2 s.e. of 2
    assert mod.compare(21.0, 20.0, 2.0) == "within noise"
    assert mod.compare(10.0, 20.0, 2.0) == "not shown"
    assert mod.compare(20.1, 20.0, None) == "shown"  # no error bar: the sign decides

    def verdicts(runs, base):
        res = {"runs": {f"{r['variant']}_adamw": r for r in runs}, "baselines": base}
        return {c.split(" (")[0]: v for c, v, _ in mod.paper_claims(res)}

    skip = _run("skip", 40.0, 30.0, 20.0, 1.4, 1.4)
    bad = _run("skipless", 20.0, 10.0, 10.0, 1e17, 1e17)
    good = _run("skipless_init", 41.0, 50.0, 25.0, 15.0, 2e4)
    v = verdicts([skip, bad, good], {"skip": _run("skip", 20.0, 10.0, 10.0, 1.4, 1.4)})
    assert (
        v["Skipless at the default init is ill-conditioned; the paper's init fixes it"] == "shown"
    )
    # finite at the end but far above the paper's tens: only partly
    assert v["After training, skipless_init stays well conditioned; skipless does not"] == (
        "partly shown"
    )
    assert v["skipless_init beats skip on dense linear probing, single block"] == "shown"
    # 50 vs 30 CorLoc on 400 images: s.e. ~3.4, a 20-point gap is far outside the noise
    assert v["skipless_init beats skip on TokenCut object discovery"] == "shown"
    pre = "(precondition, not a paper claim) pretraining taught skip something"
    assert v[pre + ": it beats its own random init"] == "shown"
    # k-NN +1 over random init on 400 items is noise; the other gains are large
    near = _run("skip", 20.5, 30.0, 20.0, 1.4, 1.4)
    v = verdicts([near], {"skip": _run("skip", 20.0, 30.5, 19.0, 1.4, 1.4)})
    # mIoU +1 with no error bar: the sign decides, and the verdict names what was shown
    assert list(v.values()) == ["shown on mIoU, mIoU multiscale only"]
    v = verdicts([near], {"skip": _run("skip", 35.0, 30.0, 19.0, 1.4, 1.4)})
    assert list(v.values()) == ["not shown"]
    # mIoU with bootstrap error bars: +1 mIoU with s.e. 1.0 each is noise, not a gain
    a, b = _run("skip", 20.5, 30.0, 21.0, 1.4, 1.4), _run("skip", 20.0, 30.5, 20.0, 1.4, 1.4)
    for k in ("linprobe_single_se", "linprobe_multiscale_se"):
        a[k] = b[k] = 1.0
    assert list(verdicts([a], {"skip": b}).values()) == ["within noise"]
    # the page's paired test (same images) replaces the unpaired s.e.: k-NN +0.5 with a
    # paired s.e. of 0.1 is a gain (unpaired, 400 items: s.e. 2.8, noise)
    res = {"runs": {"skip_adamw": a}, "baselines": {"skip": b},
           "evaluations": {"knn": {"runs": {"skip_adamw": {"vs_floor": {"se": 0.1}}}}}}  # fmt: skip
    assert [v for _, v, _ in mod.paper_claims(res)] == ["shown on k-NN only"]
    a["linprobe_single_miou"] = 10.0  # 10 points below: more than 2 s.e. of the difference
    assert list(verdicts([a], {"skip": b}).values()) == ["not shown"]


def test_finished_reuses_only_completed_runs(tmp_path):
    # backbone.json and summary.json are tracked with the results, so a run is complete only
    # when its summary says so and its weights are there
    finished = _load_script().finished
    assert not finished(tmp_path)
    (tmp_path / "backbone.json").write_text("{}")
    assert not finished(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"finished": True}))
    assert not finished(tmp_path)  # a results folder's copy: the weights are not tracked
    (tmp_path / "backbone.pt").write_bytes(b"")
    (tmp_path / "summary.json").write_text(json.dumps({"finished": False}))
    assert not finished(tmp_path)  # stopped at run.max_steps: resume it
    (tmp_path / "summary.json").write_text(json.dumps({"finished": True}))
    assert finished(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"task": "cls", "steps": 496}))
    assert finished(tmp_path)  # supervised summaries are written only at the end


def test_gap_share_se_is_the_delta_method_of_the_two_paired_errors():
    share_se = _load_script().share_se
    gain, room = {"diff": 10.0, "se": 1.0}, {"diff": 50.0, "se": 2.0}
    # by hand: f = 0.2, sqrt(1 + 0.2^2 * 2^2) / 50
    assert share_se(gain, room, 50.0) == pytest.approx(math.sqrt(1.16) / 50, rel=1e-12)
    # against simulation: independent normal errors on the gain and on the gap
    rng = np.random.default_rng(0)
    ratio = rng.normal(10, 1, 200_000) / rng.normal(50, 2, 200_000)
    assert share_se(gain, room, 50.0) == pytest.approx(ratio.std(), rel=0.02)
    assert share_se({"diff": 1.0, "se": None}, room, 50.0) is None
    assert share_se(gain, room, 0.0) is None


def test_recipe_diff_names_the_keys_that_change_what_a_run_learns():
    mod = _load_script()
    have = {"optim": {"lr": 1e-3, "epochs": 4}, "data": {"path": None},
            "run": {"seed": 0, "out": "runs/a", "jacobian_every_epochs": 12}}  # fmt: skip
    same = {**have, "run": {**have["run"], "out": "runs/b", "jacobian_every_epochs": 24}}
    assert mod.recipe_diff(have, same) == []  # where and how it logs: not the recipe
    other = {**have, "optim": {"lr": 1e-3, "epochs": 8}, "run": {**have["run"], "seed": 1}}
    assert mod.recipe_diff(have, other) == ["optim.epochs: 4 vs 8", "run.seed: 0 vs 1"]
    home = str(Path.home() / "data" / "imgs")
    stored = {**have, "data": {"path": "~/data/imgs"}}  # config.yaml records it portably
    assert mod.recipe_diff(stored, {**have, "data": {"path": home}}) == []
    # a key added to the config after the run was trained compares as its class default (a new
    # key's default keeps the old behaviour); without defaults it is a difference
    defaults = {"dino": {"koleo_weight": 0.0}}
    assert mod.recipe_diff(have, {**have, **defaults}, defaults) == []
    koleo = {**have, "dino": {"koleo_weight": 0.1}}
    assert mod.recipe_diff(have, koleo, defaults) == ["dino.koleo_weight: 0.0 vs 0.1"]
    assert mod.recipe_diff(have, {**have, **defaults}) == ["dino.koleo_weight: None vs 0.0"]
