"""How hierarchical are a network's blocks: linear CKA between the features of every pair of
depths, the minibatch estimator, the summary numbers, their bootstrap over images, and the
verdict of the claim "variant A's blocks are more hierarchical than B's" (pure functions; the
stage is ``python -m dino_skipless.hierarchy``).

**Linear CKA** (Kornblith et al. 2019, "Similarity of neural network representations
revisited"). For the same n examples seen by two representations ``X (n, p)`` and ``Y (n, q)``,
with linear Gram matrices ``K = X Xᵀ`` and ``L = Y Yᵀ``::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

with either HSIC estimator:

* biased (Gretton et al. 2005): ``HSIC_0 = tr(K H L H) / (n - 1)²``, ``H = I - 11ᵀ/n``;
* unbiased (Song et al. 2012): with ``K~``, ``L~`` the Grams with their diagonals zeroed,
  ``HSIC_1 = [tr(K~ L~) + (1ᵀK~1)(1ᵀL~1) / ((n-1)(n-2)) - 2/(n-2) 1ᵀK~L~1] / (n(n-3))``.
  CKA built on it is Kornblith's "debiased" CKA. It equals ``<K^, L^> / (n(n-3))`` with
  ``K^`` the U-centred Gram (Székely & Rizzo 2014), which is how every pair is computed here at
  once: U-centre each depth's Gram, then one matrix product of the flattened Grams.

Both are invariant to orthogonal transforms and isotropic scaling of either representation,
and CKA(X, X) = 1. U-centring cancels any added ``a_i + a_j`` term exactly, so the unbiased HSIC
is also invariant to translating the features; ``batch_hsic`` subtracts the batch mean before
forming the Grams, which keeps float rounding away from the large common mean of a residual
stream.

**Minibatch CKA** (Nguyen, Raghu & Kornblith 2021, "Do wide and deep networks learn the same
things?"). Over k minibatches of examples,
``CKA_mb(X, Y) = mean_b HSIC_1(K_b, L_b) / sqrt(mean_b HSIC_1(K_b, K_b) mean_b HSIC_1(L_b, L_b))``.
Each ``HSIC_1`` is unbiased, so the three means converge to the population HSICs as k grows and
CKA_mb to the population CKA, with memory set by the minibatch, not by the number of images.

**Summary numbers** of a CKA matrix over depths ``0..L`` (0 = the patch embedding entering the
first block, ``i + 1`` = the output of block ``i``; a CLS-token matrix starts at block 0, see
``HAS_EMBEDDING``, and has one adjacent pair fewer):

* ``adjacent[i] = CKA(depth i, depth i + 1)``: how similar block ``i``'s output is to its input;
* ``adjacent_mean``: the mean of those L values;
* ``first_last``: CKA between the outputs of the first and the last block;
  ``embed_last``: between the patch embedding and the last block's output;
* ``effective_depth``: the number of blocks whose output is less than ``threshold`` (0.9)
  CKA-similar to their input, ``#{i : adjacent[i] < threshold}`` (an undefined CKA, NaN, does
  not count). Why 0.9: for a block that adds to its input x an update u uncorrelated with x,
  both isotropic, linear CKA(x, x + u) = 1 / (1 + r) with r = E|u|² / E|x|². CKA < 0.9 is
  r > 1/9: the block changes its input by more than a third of its norm (|u| / |x| > 1/3).
  A block below that does little work; a residual stream in which every block adds a small
  update stays above it. The threshold is a convention, not a published value: ``adjacent``
  is kept in full so any other threshold can be read off.

**Bootstrap over images.** The minibatches are disjoint groups of images in a seeded random
order, so resampling the minibatches with replacement (and recomputing CKA_mb from the
resampled HSIC sums) is a bootstrap over images in blocks of a minibatch. With the same images,
order and seed, every model draws the same resamples: differences between models are then
paired (the image noise they share cancels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .stats import NOISE_SE
from .stats import verdict as seed_verdict

# The threshold-free summaries are lower for a more hierarchical network (blocks that change
# their input more); the effective depth is higher.
STATISTICS = ("adjacent_mean", "first_last", "embed_last", "effective_depth")
LOWER_IS_MORE_HIERARCHICAL = {
    "adjacent_mean": True,
    "first_last": True,
    "embed_last": True,
    "effective_depth": False,
}
# Token kinds: patch-token maps start at the patch embedding; CLS maps at block 0, because the
# CLS token entering block 0 is one learned vector, the same for every image (no CKA defined).
KINDS = ("patch", "cls")
HAS_EMBEDDING = {"patch": True, "cls": False}
KIND_NAMES = {"patch": "patch tokens", "cls": "CLS token"}
DEFAULT_THRESHOLD = 0.9  # see the module docstring: |update| / |input| > 1/3


# ---------------------------------------------------------------------------------- HSIC, CKA


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """``(..., n, d) -> (..., n, n)``: ``X Xᵀ``."""
    return x @ x.transpose(-1, -2)


def u_center(k: torch.Tensor) -> torch.Tensor:
    """U-centred Gram(s) ``(..., n, n)``, n >= 4: ``<u_center(K), u_center(L)> / (n(n-3))`` is
    the unbiased HSIC_1. A new tensor; the input is left alone."""
    n = k.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples, got {n}")
    k = k.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    means = k.sum(-1) / (n - 2)
    means = means - means.sum(-1, keepdim=True) / (2 * (n - 1))
    k -= means[..., :, None]
    k -= means[..., None, :]
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def h_center(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` with ``H = I - 11ᵀ/n`` (the biased estimator's centring)."""
    k = k - k.mean(-1, keepdim=True)
    return k - k.mean(-2, keepdim=True)


def hsic_unbiased(k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012)'s unbiased HSIC_1 of two ``(n, n)`` Grams K and L (here ``k``, ``g``),
    by its formula (the reference that the batched ``hsic_matrix`` is checked against)."""
    n = k.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples, got {n}")
    kt = k - torch.diag_embed(torch.diagonal(k, dim1=-2, dim2=-1))
    gt = g - torch.diag_embed(torch.diagonal(g, dim1=-2, dim2=-1))
    ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
    trace = (kt * gt.transpose(-1, -2)).sum((-1, -2))
    sums = (ones.T @ kt @ ones).squeeze() * (ones.T @ gt @ ones).squeeze()
    cross = (ones.T @ kt @ gt @ ones).squeeze()
    return (trace + sums / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)) / (n * (n - 3))


def hsic_biased(k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``tr(K H L H) / (n - 1)²`` of two ``(n, n)`` Grams K and L (here ``k``, ``g``)."""
    n = k.shape[-1]
    return (h_center(k) * h_center(g)).sum((-1, -2)) / (n - 1) ** 2


def hsic_matrix(grams: torch.Tensor, debiased: bool = True) -> torch.Tensor:
    """``(R, n, n)`` Grams of R representations of the same n examples -> ``(R, R)`` HSIC of
    every pair, from one product of the flattened centred Grams."""
    n = grams.shape[-1]
    if debiased:
        c = u_center(grams).reshape(grams.shape[0], -1)
        return c @ c.T / (n * (n - 3))
    c = h_center(grams).reshape(grams.shape[0], -1)
    return c @ c.T / (n - 1) ** 2


def cka_from_hsic(h: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """``(..., R, R)`` HSIC -> CKA ``h_ab / sqrt(h_aa h_bb)``; NaN where a representation has no
    positive self-HSIC (constant over the examples: its CKA is undefined)."""
    if torch.is_tensor(h):
        d = torch.diagonal(h, dim1=-2, dim2=-1)
        s = torch.where(d > 0, d, torch.full_like(d, float("nan"))).sqrt()
    else:
        d = np.diagonal(h, 0, -2, -1)
        s = np.sqrt(np.where(d > 0, d, np.nan))
    return h / (s[..., :, None] * s[..., None, :])


def linear_cka(x, y, debiased: bool = False) -> float:
    """Linear CKA of two representations ``(n, p)``, ``(n, q)`` of the same n examples
    (arrays or tensors; computed in float64)."""
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y, dtype=torch.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples in both: {x.shape[0]} vs {y.shape[0]} rows")
    h = hsic_matrix(torch.stack([gram_linear(x), gram_linear(y)]), debiased)
    return float(cka_from_hsic(h)[0, 1])


def batch_hsic(reps: torch.Tensor) -> torch.Tensor:
    """One minibatch of the estimator: ``reps (R, n, d)`` (R representations of the same n
    examples, any float dtype) -> ``(R, R)`` float64 unbiased HSIC of every pair."""
    x = reps.double()
    x = x - x.mean(1, keepdim=True)  # exact for HSIC_1 (module docstring), kinder to rounding
    return hsic_matrix(gram_linear(x), debiased=True)


def minibatch_cka(hsic_batches) -> np.ndarray:
    """``(k, R, R)`` per-minibatch HSIC_1 -> ``(R, R)`` minibatch CKA (Nguyen et al. 2021)."""
    h = np.asarray(hsic_batches, dtype=np.float64)
    return cka_from_hsic(h.mean(0))


# ---------------------------------------------------------------------------------- summaries


def adjacent(cka: np.ndarray) -> np.ndarray:
    """``(..., L+1, L+1)`` -> ``(..., L)``: CKA of each block's output with its input."""
    return np.diagonal(cka, 1, -2, -1)


def effective_depth(adj: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Blocks whose output is less than ``threshold`` CKA-similar to their input (NaN: not
    counted), over the last axis."""
    with np.errstate(invalid="ignore"):
        return (np.asarray(adj) < threshold).sum(-1)


def summary_stats(
    cka: np.ndarray, threshold: float = DEFAULT_THRESHOLD, embedding: bool = True
) -> dict[str, np.ndarray]:
    """The summary numbers of ``(..., R, R)`` CKA matrices (module docstring), each of shape
    ``(...)``. ``embedding``: depth 0 is the patch embedding (R = L + 1); else the matrices
    start at block 0 (R = L, the CLS token's maps) and ``embed_last`` is NaN."""
    cka = np.asarray(cka, dtype=np.float64)
    adj = adjacent(cka)
    return {
        "adjacent_mean": adj.mean(-1),
        "first_last": cka[..., int(embedding), -1],
        "embed_last": cka[..., 0, -1] if embedding else np.full(cka.shape[:-2], np.nan),
        "effective_depth": effective_depth(adj, threshold).astype(np.float64),
    }


def summarise(
    hsic_batches,
    threshold: float = DEFAULT_THRESHOLD,
    n_boot: int = 0,
    seed: int = 0,
    embedding: bool = True,
) -> dict:
    """The record of one representation kind of one model: the CKA matrix, ``adjacent``, the
    summary numbers (NaN: undefined) and, with ``n_boot > 0``, each one's bootstrap s.e. and
    95 % interval over images (``bootstrap``)."""
    h = np.asarray(hsic_batches, dtype=np.float64)
    cka = minibatch_cka(h)
    stats = summary_stats(cka, threshold, embedding)
    out = {
        "matrix": cka.tolist(),
        "adjacent": adjacent(cka).tolist(),
        **{k: float(v) for k, v in stats.items()},
        "threshold": threshold,
        "n_batches": int(h.shape[0]),
    }
    if n_boot > 0 and h.shape[0] > 1:
        reps = bootstrap_stats(h, n_boot, seed, threshold, embedding)
        out["bootstrap"] = {
            k: {
                "se": float(np.nanstd(v, ddof=1)),
                "ci95": [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))],
            }
            for k, v in reps.items()
            if np.isfinite(v).sum() > 1
        }
        out["n_boot"] = n_boot
    return out


# ---------------------------------------------------------------------------------- bootstrap


def bootstrap_weights(k: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``(n_boot, k)`` multiplicities of k minibatches resampled with replacement (each row
    sums to k): the same rows for every model with the same ``k`` and ``seed``."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, k, size=(n_boot, k))
    w = np.zeros((n_boot, k))
    np.add.at(w, (np.arange(n_boot)[:, None], draws), 1.0)
    return w


def resampled_cka(hsic_batches, weights: np.ndarray) -> np.ndarray:
    """``(n_boot, R, R)`` minibatch CKA of each resample (``weights (n_boot, k)``)."""
    h = np.asarray(hsic_batches, dtype=np.float64)
    k, r = h.shape[0], h.shape[-1]
    means = (weights @ h.reshape(k, -1) / k).reshape(-1, r, r)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cka_from_hsic(means)


def bootstrap_stats(
    hsic_batches,
    n_boot: int,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    embedding: bool = True,
) -> dict[str, np.ndarray]:
    """Each summary number over ``n_boot`` resamples of the minibatches: ``(n_boot,)`` each."""
    h = np.asarray(hsic_batches, dtype=np.float64)
    w = bootstrap_weights(h.shape[0], n_boot, seed)
    return summary_stats(resampled_cka(h, w), threshold, embedding)


# ---------------------------------------------------------------------------------- the claim


def _hsic_of(result: Mapping, kind: str) -> np.ndarray:
    try:
        return np.asarray(result["hsic_batches"][kind], dtype=np.float64)
    except KeyError:
        raise ValueError(
            f"a hierarchy result without per-minibatch HSIC of {kind!r} tokens: pass the dicts "
            "of hierarchy_eval.evaluate_model or hierarchy_eval.load_results"
        ) from None


def hierarchy_claim(
    results: Mapping[str, Sequence[Mapping]],
    *,
    candidate: str = "skipless_init",
    baseline: str = "skip",
    kind: str = "patch",
    statistic: str = "adjacent_mean",
    threshold: float = DEFAULT_THRESHOLD,
    n_boot: int = 2000,
    seed: int = 0,
    noise_se: float = NOISE_SE,
    per_model: bool = False,
) -> dict:
    """Verdict on "``candidate``'s blocks are more hierarchical than ``baseline``'s" by one
    summary number (default: lower adjacent-block CKA of patch tokens).

    ``results``: ``{variant: [one hierarchy result per training seed]}`` (the dicts of
    ``hierarchy_eval.evaluate_model`` / ``load_results``, which carry ``hsic_batches``). A
    variant's value is the mean over its seeds. Its uncertainty is a hierarchical bootstrap:
    each resample draws the seeds of every variant with replacement (where a variant has more
    than one) and, within each drawn model, the image minibatches. When every result was
    computed on the same images (same ``images_digest`` and number of minibatches), one image
    resample is shared by all models (paired: the noise of the image set cancels in the
    difference); otherwise each model is resampled on its own. With few seeds the seed level
    understates the between-seed variance by about (S - 1) / S.

    A claim about *variants* rests on training-seed noise (``stats``): with fewer than two
    results of either variant the verdict is ``stats.verdict``'s ``untested (one seed)``, and the
    evidence still gives the image-bootstrap Δ ± s.e. ``per_model=True`` states the verdict
    about these very models instead (image noise only: what the stage says of one pair).

    Returns ``claim``, ``verdict`` (``shown`` / ``within noise`` (the difference is smaller than
    ``noise_se`` s.e.) / ``not shown`` / ``untested (one seed)``, as the replication's claims
    table), ``evidence`` (one
    line for the table), ``row`` = (claim, verdict, evidence), ``diff`` (candidate − baseline),
    ``se``, ``ci95``, ``z``, ``paired``, and per variant the mean and per-seed values.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; valid: {', '.join(STATISTICS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown token kind {kind!r}; valid: {', '.join(KINDS)}")
    emb = HAS_EMBEDDING[kind]
    if statistic == "embed_last" and not emb:
        raise ValueError("embed_last is defined for patch tokens only (CLS maps start at block 0)")
    for v in (candidate, baseline):
        if not results.get(v):
            raise ValueError(f"no hierarchy result for variant {v!r} (have: {sorted(results)})")
    models = {v: [_hsic_of(r, kind) for r in results[v]] for v in (candidate, baseline)}
    everyone = [r for v in (candidate, baseline) for r in results[v]]
    ks = {m.shape[0] for ms in models.values() for m in ms}
    digests = {r.get("images_digest") for r in everyone}
    paired = len(ks) == 1 and len(digests) == 1 and None not in digests
    rng = np.random.default_rng(seed)
    shared = bootstrap_weights(ks.pop(), n_boot, seed) if paired else None

    per_variant, replicates = {}, {}
    for v, ms in models.items():
        points = [float(summary_stats(minibatch_cka(m), threshold, emb)[statistic]) for m in ms]
        boots = []
        for j, m in enumerate(ms):
            w = shared if paired else bootstrap_weights(m.shape[0], n_boot, seed + 1 + j)
            boots.append(summary_stats(resampled_cka(m, w), threshold, emb)[statistic])
        boots = np.stack(boots)  # (S, n_boot)
        s = len(ms)
        pick = rng.integers(0, s, size=(n_boot, s)) if s > 1 else np.zeros((n_boot, 1), int)
        replicates[v] = np.take_along_axis(boots.T, pick, axis=1).mean(1)
        per_variant[v] = {"mean": float(np.mean(points)), "per_seed": points, "n_seeds": s}
    diff = per_variant[candidate]["mean"] - per_variant[baseline]["mean"]
    d = replicates[candidate] - replicates[baseline]
    se = float(np.nanstd(d, ddof=1))
    ci = [float(np.nanpercentile(d, 2.5)), float(np.nanpercentile(d, 97.5))]
    z = diff / se if se > 0 else None
    better = diff < 0 if LOWER_IS_MORE_HIERARCHICAL[statistic] else diff > 0
    if not math.isfinite(diff):
        verdict = "not shown"
    elif se > 0 and abs(diff) < noise_se * se:
        verdict = "within noise"
    else:
        verdict = "shown" if better else "not shown"
    if not per_model and min(per_variant[v]["n_seeds"] for v in per_variant) < 2:
        verdict = seed_verdict(diff, None)
    what = STAT_TITLES[statistic].format(threshold=threshold)
    claim = (
        f"{candidate}'s blocks are more hierarchical than {baseline}'s "
        f"({'lower' if LOWER_IS_MORE_HIERARCHICAL[statistic] else 'higher'} {what})"
    )
    n_seeds = [per_variant[v]["n_seeds"] for v in (candidate, baseline)]
    seeds = (
        "one model per variant"
        if n_seeds == [1, 1]
        else f"and over seeds ({candidate} {n_seeds[0]}, {baseline} {n_seeds[1]})"
    )
    evidence = (
        f"{what}, {KIND_NAMES[kind]}: {candidate} {per_variant[candidate]['mean']:.3f} vs "
        f"{baseline} {per_variant[baseline]['mean']:.3f}, Δ {diff:+.3f} ± {se:.3f} s.e. (95 % CI "
        f"{ci[0]:+.3f} to {ci[1]:+.3f}); bootstrap over images{' (paired)' if paired else ''}, "
        f"{seeds}"
    )
    return {
        "claim": claim,
        "verdict": verdict,
        "evidence": evidence,
        "row": (claim, verdict, evidence),
        "statistic": statistic,
        "kind": kind,
        "diff": diff,
        "se": se,
        "ci95": ci,
        "z": z,
        "paired": paired,
        "n_boot": n_boot,
        "noise_se": noise_se,
        "variants": per_variant,
    }


STAT_TITLES = {
    "adjacent_mean": "adjacent-block CKA",
    "first_last": "first-to-last block CKA",
    "embed_last": "embedding-to-last block CKA",
    "effective_depth": "effective depth (blocks with CKA to their input < {threshold})",
}
