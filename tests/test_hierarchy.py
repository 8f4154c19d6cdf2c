"""Linear CKA, the unbiased HSIC, the minibatch estimator, the summary numbers, their bootstrap
and the claim verdict (dino_skipless/hierarchy_lib.py), against published values, formulas and
population values."""

import numpy as np
import pytest
import torch

from dino_skipless.hierarchy_lib import (
    adjacent,
    batch_hsic,
    bootstrap_stats,
    bootstrap_weights,
    cka_from_hsic,
    effective_depth,
    gram_linear,
    hierarchy_claim,
    hsic_biased,
    hsic_matrix,
    hsic_unbiased,
    linear_cka,
    minibatch_cka,
    summarise,
    summary_stats,
)


def demo_xy():
    # Kornblith et al.'s CKA demo notebook (google-research/representation_similarity)
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def test_published_demo_values():
    x, y = demo_xy()
    assert linear_cka(x, y) == pytest.approx(0.55761, abs=5e-6)
    assert linear_cka(x, y, debiased=True) == pytest.approx(0.51346, abs=5e-6)


def test_batched_hsic_equals_the_formulas():
    g = torch.Generator().manual_seed(0)
    n = 12
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64) for d in (3, 5, 7)]
    grams = torch.stack([gram_linear(x) for x in xs])
    h1 = hsic_matrix(grams, debiased=True)
    h0 = hsic_matrix(grams, debiased=False)
    hh = torch.eye(n, dtype=torch.float64) - 1.0 / n
    for a in range(3):
        for b in range(3):
            # Song et al. (2012) by its formula, and Gretton et al. (2005) with an explicit H
            assert h1[a, b] == pytest.approx(float(hsic_unbiased(grams[a], grams[b])), rel=1e-10)
            ref = torch.trace(grams[a] @ hh @ grams[b] @ hh) / (n - 1) ** 2
            assert h0[a, b] == pytest.approx(float(ref), rel=1e-10)
            assert h0[a, b] == pytest.approx(float(hsic_biased(grams[a], grams[b])), rel=1e-10)
    # the debiased HSIC is not the biased one (the test above could not pass by accident)
    assert not torch.allclose(h0, h1)


def test_cka_of_a_representation_with_itself_is_one():
    x, _ = demo_xy()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-12)
    h = np.stack([batch_hsic(torch.as_tensor(np.stack([x[i : i + 20]] * 2))).numpy()
                  for i in range(0, 100, 20)])  # fmt: skip
    assert minibatch_cka(h)[0, 1] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(debiased):
    x, y = demo_xy()
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(10, 10)))
    base = linear_cka(x, y, debiased)
    assert linear_cka(x @ q, y, debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 7.5 * y @ q.T, debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 3.0, y, debiased) == pytest.approx(base, abs=1e-10)
    # ...but not to an anisotropic scaling (so the checks above can fail)
    d = np.diag(np.linspace(0.1, 3.0, 10))
    assert abs(linear_cka(x @ d, y, debiased) - base) > 1e-2


def test_batch_hsic_survives_a_large_common_mean():
    # the residual stream's large mean: subtracting the batch mean is exact for HSIC_1
    g = torch.Generator().manual_seed(1)
    reps = torch.randn(3, 16, 8, generator=g, dtype=torch.float64)
    shifted = reps + 1e4
    ref = hsic_matrix(gram_linear(reps))
    assert torch.allclose(batch_hsic(shifted), ref, rtol=1e-9, atol=1e-12)


def test_minibatch_cka_converges_to_the_population_and_to_the_full_estimate():
    # X ~ N(0, I_d), Y = X + E with E ~ N(0, I_d): population linear CKA
    # = |Cov(X, Y)|_F^2 / (|Cov X|_F |Cov Y|_F) = d / (sqrt(d) * 2 sqrt(d)) = 1/2.
    rng = np.random.default_rng(0)
    d, n, k = 10, 50, 400
    x = rng.normal(size=(k * n, d))
    y = x + rng.normal(size=(k * n, d))
    batches = torch.as_tensor(np.stack([x, y]).reshape(2, k, n, d)).permute(1, 0, 2, 3)
    h = np.stack([batch_hsic(b).numpy() for b in batches])
    errors = [abs(minibatch_cka(h[:m])[0, 1] - 0.5) for m in (1, 400)]
    assert errors[1] < 0.01 < errors[0]
    # one minibatch is the full-data debiased CKA of its examples
    assert minibatch_cka(h[:1])[0, 1] == pytest.approx(linear_cka(x[:n], y[:n], True), abs=1e-12)
    # all of them: the same value as the full-data estimate (memory of one minibatch only)
    full = linear_cka(x[:4000], y[:4000], debiased=True)
    assert minibatch_cka(h[:80])[0, 1] == pytest.approx(full, abs=0.01)


def test_cka_of_a_constant_representation_is_undefined():
    reps = torch.randn(2, 8, 4, dtype=torch.float64)
    reps[1] = 1.0
    assert np.isnan(cka_from_hsic(batch_hsic(reps).numpy())[0, 1])


def test_summary_numbers_by_hand():
    cka = np.array(
        [
            [1.00, 0.95, 0.60, 0.30],
            [0.95, 1.00, 0.85, 0.40],
            [0.60, 0.85, 1.00, 0.90],
            [0.30, 0.40, 0.90, 1.00],
        ]
    )
    np.testing.assert_allclose(adjacent(cka), [0.95, 0.85, 0.90])
    s = summary_stats(cka, threshold=0.9)
    assert s["adjacent_mean"] == pytest.approx((0.95 + 0.85 + 0.90) / 3)
    assert s["first_last"] == pytest.approx(0.40)  # block 0 (depth 1) vs the last block
    assert s["embed_last"] == pytest.approx(0.30)
    assert s["effective_depth"] == 1  # only 0.85 < 0.9; exactly 0.90 does not count
    assert effective_depth(adjacent(cka), 0.95) == 2
    no_emb = summary_stats(cka, threshold=0.9, embedding=False)  # a CLS map: block 0 first
    assert no_emb["first_last"] == pytest.approx(0.30) and np.isnan(no_emb["embed_last"])
    assert effective_depth(np.array([np.nan, 0.5]), 0.9) == 1  # undefined: not counted


def test_threshold_rationale():
    # hierarchy_lib: CKA(x, x + u) = 1 / (1 + r) for isotropic, uncorrelated u with
    # E|u|^2 = r E|x|^2, so CKA 0.9 <=> |u| / |x| = 1/3
    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(40, 250, 16)))
    u = torch.as_tensor(rng.normal(size=(40, 250, 16))) / 3
    h = np.stack([batch_hsic(torch.stack([a, a + b])).numpy() for a, b in zip(x, u)])
    assert minibatch_cka(h)[0, 1] == pytest.approx(0.9, abs=0.005)


def chain_hsic(rng, k, n, step, depth=3, d=6):
    """Per-minibatch HSIC of a chain r_{i+1} = r_i + step * noise (first depth = 'embedding')."""
    out = []
    for _ in range(k):
        r = [rng.normal(size=(n, d))]
        for _ in range(depth):
            r.append(r[-1] + step * rng.normal(size=(n, d)))
        out.append(batch_hsic(torch.as_tensor(np.stack(r))).numpy())
    return np.stack(out)


def test_bootstrap_weights_resample_with_replacement():
    w = bootstrap_weights(5, 200, seed=3)
    assert w.shape == (200, 5) and np.all(w.sum(1) == 5) and np.all(w >= 0)
    np.testing.assert_array_equal(w, bootstrap_weights(5, 200, seed=3))  # paired across models
    assert (w.max(1) > 1).mean() > 0.9  # with replacement


def test_bootstrap_se_matches_the_spread_over_independent_image_sets():
    rng = np.random.default_rng(0)
    reps = [chain_hsic(rng, 16, 24, 0.7) for _ in range(80)]
    truth = np.std([summary_stats(minibatch_cka(h))["adjacent_mean"] for h in reps], ddof=1)
    se = np.mean([np.std(bootstrap_stats(h, 300, seed=1)["adjacent_mean"], ddof=1)
                  for h in reps[:20]])  # fmt: skip
    assert 0.7 < se / truth < 1.4


def test_summarise_record():
    h = chain_hsic(np.random.default_rng(0), 6, 16, 0.5)
    rec = summarise(h, threshold=0.9, n_boot=100)
    assert np.asarray(rec["matrix"]).shape == (4, 4) and len(rec["adjacent"]) == 3
    assert rec["n_batches"] == 6 and rec["bootstrap"]["adjacent_mean"]["se"] > 0
    lo, hi = rec["bootstrap"]["adjacent_mean"]["ci95"]
    assert lo < rec["adjacent_mean"] < hi


def fake_results(rng, step, seeds=1, k=12, digest="imgs"):
    """Hierarchy results of ``seeds`` models whose blocks add ``step``-sized updates."""
    return [
        {"hsic_batches": {"patch": chain_hsic(rng, k, 16, step), "cls": chain_hsic(rng, k, 16, step)},
         "images_digest": digest}
        for _ in range(seeds)
    ]  # fmt: skip


def test_claim_shown_when_the_candidate_changes_more_per_block():
    rng = np.random.default_rng(0)
    res = {"skipless_init": fake_results(rng, 1.0), "skip": fake_results(rng, 0.2)}
    c = hierarchy_claim(res, n_boot=500, per_model=True)
    assert c["verdict"] == "shown" and c["diff"] < 0 and c["paired"]
    assert c["ci95"][1] < 0 and c["z"] < -2
    assert c["row"] == (c["claim"], c["verdict"], c["evidence"])
    assert "adjacent-block CKA" in c["claim"] and "± " in c["evidence"]
    # the effective depth runs the other way: higher is more hierarchical
    e = hierarchy_claim(res, statistic="effective_depth", threshold=0.95, n_boot=200,
                        per_model=True)  # fmt: skip
    assert e["diff"] > 0 and e["verdict"] == "shown"
    # the opposite claim on the same numbers
    rev = hierarchy_claim(res, candidate="skip", baseline="skipless_init", n_boot=200,
                          per_model=True)  # fmt: skip
    assert rev["verdict"] == "not shown" and rev["diff"] > 0


def test_claim_within_noise_for_the_same_model_family():
    rng = np.random.default_rng(1)
    res = {"skipless_init": fake_results(rng, 0.6), "skip": fake_results(rng, 0.6)}
    c = hierarchy_claim(res, n_boot=500, per_model=True)
    assert c["verdict"] == "within noise" and abs(c["diff"]) < 2 * c["se"]


def test_claim_seeds_add_their_spread_and_unpaired_images_are_resampled_apart():
    rng = np.random.default_rng(2)
    same = {"skipless_init": fake_results(rng, 0.8, seeds=1), "skip": fake_results(rng, 0.3)}
    spread = {
        "skipless_init": [*fake_results(rng, 0.4), *fake_results(rng, 0.8),
                          *fake_results(rng, 1.6)],
        "skip": fake_results(rng, 0.3),
    }  # fmt: skip
    a, b = hierarchy_claim(same, n_boot=500), hierarchy_claim(spread, n_boot=500)
    assert b["variants"]["skipless_init"]["n_seeds"] == 3
    assert b["variants"]["skipless_init"]["mean"] == pytest.approx(
        np.mean(b["variants"]["skipless_init"]["per_seed"])
    )
    assert b["se"] > 2 * a["se"]  # the between-seed spread dominates
    other = {"skipless_init": fake_results(rng, 0.8, digest="A"), "skip": fake_results(rng, 0.3)}
    assert not hierarchy_claim(other, n_boot=100)["paired"]


def test_claim_about_variants_needs_two_seeds_of_each():
    # as stats.verdict: one model per variant says nothing about seed noise, however clear
    # the difference between the two models
    rng = np.random.default_rng(3)
    one = {"skipless_init": fake_results(rng, 1.0), "skip": fake_results(rng, 0.2)}
    c = hierarchy_claim(one, n_boot=200)
    assert c["verdict"] == "untested (one seed)" and c["diff"] < 0 and c["se"] > 0
    three = {"skipless_init": fake_results(rng, 1.0, seeds=3), "skip": fake_results(rng, 0.2)}
    assert hierarchy_claim(three, n_boot=200)["verdict"] == "untested (one seed)"
    three["skip"] = fake_results(rng, 0.2, seeds=2)
    assert hierarchy_claim(three, n_boot=200)["verdict"] == "shown"


def test_claim_errors():
    rng = np.random.default_rng(0)
    res = {"skip": fake_results(rng, 0.2)}
    with pytest.raises(ValueError, match="skipless_init"):
        hierarchy_claim(res)
    res["skipless_init"] = fake_results(rng, 0.5)
    with pytest.raises(ValueError, match="unknown statistic"):
        hierarchy_claim(res, statistic="median")
    with pytest.raises(ValueError, match="patch tokens only"):
        hierarchy_claim(res, kind="cls", statistic="embed_last")
    with pytest.raises(ValueError, match="per-minibatch HSIC"):
        hierarchy_claim({"skip": [{}], "skipless_init": [{}]})
