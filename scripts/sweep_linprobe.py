"""Collect linear-probe results into one table in the paper's Table 2 layout.

Rows = checkpoints (label), columns = dataset x probe (single / multiscale), cells = mIoU (%)
at the best lr. Reads ``results.json`` files written by ``python -m eval.linprobe`` (single
runs or ``--sweep-ckpts`` runs; folders are searched recursively). To *run* several
checkpoints, use ``python -m eval.linprobe --sweep-ckpts CKPT ...``; this script joins runs made
on different datasets (or machines) afterwards.

    python scripts/sweep_linprobe.py results/lp_voc results/lp_ade results/lp_coco \
        --out results/table2.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_skipless.fileio import atomic_write_text, markdown_table, write_json  # noqa: E402


def probes_of(result: dict) -> dict[str, dict]:
    """{probe name: result with miou/layers} of one results.json (top level + multiscale)."""
    out = {result.get("probe", "single"): result}
    if isinstance(result.get("multiscale"), dict):
        out["multiscale"] = result["multiscale"]
    return out


def collect(paths) -> list[dict]:
    files = []
    for p in map(Path, paths):
        files += sorted(p.rglob("results.json")) if p.is_dir() else [p]
    return [json.loads(f.read_text()) for f in files]


def pivot(results: list[dict]) -> tuple[list[str], list[list]]:
    cols, rows = [], {}
    for r in results:
        for probe, pr in probes_of(r).items():
            col = f"{r['dataset']} {probe}"
            if col not in cols:
                cols.append(col)
            rows.setdefault(r.get("label", "?"), {})[col] = pr["miou"]
    table = [[label] + [cells.get(c, "-") for c in cols] for label, cells in rows.items()]
    return ["ckpt"] + cols, table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="results.json files or folders holding them")
    ap.add_argument("--out", default=None, help="write the table here (.md; .json beside it)")
    args = ap.parse_args(argv)
    results = collect(args.paths)
    if not results:
        raise SystemExit(f"no results.json under {args.paths}")
    headers, rows = pivot(results)
    table = markdown_table(headers, rows)
    print(table)
    if args.out:
        out = Path(args.out)
        atomic_write_text(out, table + "\n")
        write_json(out.with_suffix(".json"), [dict(zip(headers, r)) for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
