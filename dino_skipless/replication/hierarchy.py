"""The hierarchy stage (``python -m dino_skipless.hierarchy``) on a replication's models: every
run at its own init and after DINO, and the supervised ceilings; the page's table and claims.

One stage invocation per model (``OUT/hierarchy/NAME/{init,end}``), so a model added in a later
sitting (another seed) reuses every earlier one. All use the same images, minibatches and
``--cka-seed``, so ``hierarchy_lib.hierarchy_claim`` pairs them: the image noise cancels in a
difference, and the seeds of a variant add the training noise a claim about variants needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..hierarchy_eval import load_results
from ..hierarchy_lib import KIND_NAMES, KINDS, hierarchy_claim

WHEN = {"init": "at init", "end": "after DINO"}
CANDIDATE, BASELINE = "skipless_init", "skip"
# the page's numbers per model: (token kind, summary statistic, column title)
COLUMNS = (
    ("patch", "adjacent_mean", "adjacent CKA, patch"),
    ("patch", "first_last", "first→last, patch"),
    ("patch", "effective_depth", "eff. depth, patch"),
    ("cls", "adjacent_mean", "adjacent CKA, CLS"),
    ("cls", "effective_depth", "eff. depth, CLS"),
)


def stage_dir(out: Path, name: str, when: str) -> Path:
    return Path(out) / "hierarchy" / name / when


def load_model(stage_out: Path) -> dict:
    """The one model record of a per-model stage folder, with its per-minibatch HSIC."""
    models = load_results(stage_out)
    if len(models) != 1:
        raise ValueError(f"{stage_out}: expected one model, found {len(models)}")
    return models[0]


def groups(results: dict, records: dict[str, dict[str, dict]]) -> dict[str, dict[str, list]]:
    """``{when: {variant: [record per seed]}}`` of the DINO runs (``records[name][when]``),
    seeds in order; ``ceiling`` holds the supervised ceilings as ``{"skip": [...]}`` by task."""
    out: dict[str, dict[str, list]] = {}
    for name, run in sorted(results["runs"].items(), key=lambda kv: kv[1].get("seed", 0)):
        for when, rec in records.get(name, {}).items():
            out.setdefault(when, {}).setdefault(run["variant"], []).append(rec)
    for name, rec in sorted(records.items()):
        if name.startswith("supervised_") and "end" in rec:
            task = name.split("_seed")[0]
            out.setdefault("ceiling", {}).setdefault(task, []).append(rec["end"])
    return out


def _value(rec: dict, kind: str, stat: str) -> float:
    v = rec["cka"][kind].get(stat)
    return float("nan") if v is None else float(v)


def summary(results: dict, records: dict[str, dict[str, dict]]) -> list[dict]:
    """One row per variant and moment (and ceiling): each column's mean over seeds, its
    between-seed s.d. (None with one seed) and the mean within-model bootstrap s.e."""
    rows = []
    for when, by_variant in groups(results, records).items():
        for variant, recs in by_variant.items():
            row = {"variant": variant, "when": when, "n_seeds": len(recs), "columns": {}}
            for kind, stat, title in COLUMNS:
                vals = np.array([_value(r, kind, stat) for r in recs])
                ses = [r["cka"][kind].get("bootstrap", {}).get(stat, {}).get("se") for r in recs]
                ses = [s for s in ses if s is not None]
                row["columns"][title] = {
                    "mean": float(np.mean(vals)),
                    "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                    "se_within": float(np.mean(ses)) if ses else None,
                    "per_seed": vals.tolist(),
                }
            rows.append(row)
    return rows


def claims(results: dict, records: dict[str, dict[str, dict]], threshold: float | None = None):
    """The claim "skipless_init's blocks are more hierarchical than skip's" (lower adjacent-
    block CKA) at init and after DINO, patch tokens and CLS: ``hierarchy_claim``'s verdict over
    seeds and images, as JSON-ready dicts with the page's ``row``."""
    out = []
    for when, by_variant in groups(results, records).items():
        if when == "ceiling" or not (by_variant.get(CANDIDATE) and by_variant.get(BASELINE)):
            continue
        thr = threshold or by_variant[BASELINE][0]["cka"]["patch"]["threshold"]
        for kind in KINDS:
            c = hierarchy_claim(
                {v: by_variant[v] for v in (CANDIDATE, BASELINE)}, kind=kind, threshold=thr
            )
            c["when"] = when
            c["row"] = [f"{c['claim']} {WHEN[when]}, {KIND_NAMES[kind]}", c["verdict"],
                        c["evidence"]]  # fmt: skip
            out.append(c)
    return out


def _cell(col: dict, digits: int = 3) -> str:
    m = col["mean"]
    if not np.isfinite(m):
        return "undefined"
    text = f"{m:.{digits}f}"
    if col["sd"] is not None:
        text += f" (s.d. {col['sd']:.{digits}f}"
        text += f", s.e. {col['se_within']:.{digits}f})" if col["se_within"] is not None else ")"
    elif col["se_within"] is not None:
        text += f" ± {col['se_within']:.{digits}f}"
    return text


def markdown(hier: dict) -> list[str]:
    """The page's section: the summary table (seed mean, between-seed s.d. beside the mean
    within-model s.e. over images) and a pointer to the figure."""
    rows = hier.get("summary") or []
    if not rows:
        return []
    titles = [t for _, _, t in COLUMNS]
    lines = [
        "",
        "## How hierarchical are the blocks? (layer-similarity, `dino_skipless.hierarchy`)",
        "",
        "Minibatch linear CKA (unbiased HSIC) between the token features of every pair of "
        f"depths, on the {hier.get('n_images', '?')} validation scenes of the probe's world; "
        "lower adjacent-block CKA = each block changes the representation more (the paper's "
        "'hierarchical'); eff. depth = blocks whose output is < "
        f"{hier.get('threshold', 0.9)} CKA-similar to their input. Mean over training seeds "
        "(s.d. between seeds, mean s.e. over images within a model); the claims are in the "
        "table above. Per-model maps and per-block k-NN: `hierarchy/NAME/{init,end}/`.",
        "",
        "| variant | when | seeds | " + " | ".join(titles) + " |",
        "|---|---|---|" + "---|" * len(titles),
    ]
    for r in rows:
        label = r["variant"] if r["when"] != "ceiling" else f"{r['variant']} (ceiling)"
        lines.append(
            f"| {label} | {WHEN.get(r['when'], 'trained')} | {r['n_seeds']} | "
            + " | ".join(_cell(r["columns"][t], 1 if "depth" in t else 3) for t in titles)
            + " |"
        )
    knn = hier.get("per_block_knn") or {}
    if knn:
        depth = max(len(v) for v in knn.values())
        lines += [
            "",
            "Where in depth the useful features live: k-NN top-1 (%) of each block's CLS token "
            "(seed 0; the page's k-NN images; the last block is the k-NN row above):",
            "",
            "| model | " + " | ".join(f"block {i}" for i in range(depth)) + " | best |",
            "|---|" + "---|" * (depth + 1),
        ]
        for label, top1 in knn.items():
            best = int(np.argmax(top1))
            lines.append(f"| {label} | " + " | ".join(f"{t:.1f}" for t in top1) + f" | {best} |")
    if hier.get("figure"):
        lines += ["", f"![CKA maps and per-block curves, seed 0]({hier['figure']})"]
    return lines
