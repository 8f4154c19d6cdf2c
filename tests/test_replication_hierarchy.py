"""The replication's hierarchy section (dino_skipless/replication/hierarchy.py): per-seed records
grouped by variant and moment, the summary's seed mean and s.d. by hand, and the claims'
verdicts following the numbers (seeds of each variant, paired images)."""

import json

import numpy as np
import pytest
from test_hierarchy import chain_hsic  # tests/ is on the path (pytest's rootdir import mode)

from dino_skipless.hierarchy_eval import load_results, save_results
from dino_skipless.hierarchy_lib import summarise
from dino_skipless.replication import hierarchy as hier


def record(rng, step):
    h = {"patch": chain_hsic(rng, 10, 16, step), "cls": chain_hsic(rng, 10, 16, step)[:, 1:, 1:]}
    return {
        "cka": {
            "patch": summarise(h["patch"], 0.9, n_boot=50),
            "cls": summarise(h["cls"], 0.9, n_boot=50, embedding=False),
        },
        "hsic_batches": h,
        "images_digest": "same-images",
        "images": {"n_images": 160},
    }


@pytest.fixture
def replication():
    """skip and skipless_init, 2 seeds each: alike at init, skipless_init's blocks changing the
    tokens five times more after training; one ceiling."""
    rng = np.random.default_rng(0)
    results = {"runs": {}}
    records = {}
    for variant, trained_step in (("skip", 0.2), ("skipless_init", 1.0)):
        for seed in (0, 1):
            name = f"{variant}_adamw" + (f"_seed{seed}" if seed else "")
            results["runs"][name] = {"variant": variant, "seed": seed}
            # the same init draw for both variants of a seed (as a paired init would differ
            # only by the variant): no difference to find
            init = record(np.random.default_rng(100 + seed), 0.5)
            records[name] = {"init": init, "end": record(rng, trained_step)}
    records["supervised_cls"] = {"end": record(rng, 0.4)}
    return results, records


def test_groups_by_moment_and_variant_in_seed_order(replication):
    results, records = replication
    g = hier.groups(results, records)
    assert set(g) == {"init", "end", "ceiling"}
    assert [len(g["end"][v]) for v in ("skip", "skipless_init")] == [2, 2]
    assert g["end"]["skip"][1] is records["skip_adamw_seed1"]["end"]
    assert g["ceiling"] == {"supervised_cls": [records["supervised_cls"]["end"]]}


def test_summary_is_the_seed_mean_and_sd(replication):
    results, records = replication
    rows = {(r["variant"], r["when"]): r for r in hier.summary(results, records)}
    col = rows[("skipless_init", "end")]["columns"]["adjacent CKA, patch"]
    vals = [records[n]["end"]["cka"]["patch"]["adjacent_mean"]
            for n in ("skipless_init_adamw", "skipless_init_adamw_seed1")]  # fmt: skip
    assert col["mean"] == pytest.approx(np.mean(vals))
    assert col["sd"] == pytest.approx(np.std(vals, ddof=1))
    assert rows[("supervised_cls", "ceiling")]["columns"]["adjacent CKA, patch"]["sd"] is None


def test_claims_follow_the_numbers_at_init_and_after_training(replication):
    results, records = replication
    by = {(c["when"], c["kind"]): c for c in hier.claims(results, records)}
    assert set(by) == {("init", "patch"), ("init", "cls"), ("end", "patch"), ("end", "cls")}
    end = by[("end", "patch")]
    assert end["verdict"] == "shown" and end["diff"] < 0 and end["paired"]
    assert "after DINO" in end["row"][0] and "over seeds (skipless_init 2, skip 2)" in end["row"][2]
    assert by[("init", "patch")]["diff"] == 0
    assert by[("init", "patch")]["verdict"] in ("within noise", "not shown")
    md = "\n".join(hier.markdown({"summary": hier.summary(results, records), "n_images": 160}))
    assert "| skipless_init | after DINO | 2 |" in md and "(ceiling)" in md


def test_one_seed_per_variant_is_untested(replication):
    results, records = replication
    results = {"runs": {n: r for n, r in results["runs"].items() if r["seed"] == 0}}
    assert {c["verdict"] for c in hier.claims(results, records)} == {"untested (one seed)"}


def test_results_file_has_no_bare_nan(tmp_path, replication):
    """The CLS token's embed_last is undefined: JSON null, not the invalid token NaN."""
    _, records = replication
    m = dict(records["supervised_cls"]["end"], label="m")
    assert np.isnan(m["cka"]["cls"]["embed_last"])
    save_results(tmp_path, {"run_id": "r", "models": [m]})
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text
    assert json.loads(text)["models"][0]["cka"]["cls"]["embed_last"] is None
    back = load_results(tmp_path)[0]
    np.testing.assert_allclose(back["hsic_batches"]["patch"], m["hsic_batches"]["patch"])
    assert hier.load_model(tmp_path)["label"] == "m"
