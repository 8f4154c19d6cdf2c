"""Paired comparison of two linear-probe runs on the same validation images (bootstrap).

    python -m eval.compare runs/lp_pretrained runs/lp_random [--probe multiscale] [--out cmp]

Is checkpoint A's mIoU really above B's (say, pretrained vs the same architecture at random
init), or within noise? Both probes were scored on the same images, so the test resamples
images once for both runs: what the runs share (hard images, rare classes) cancels, and the
spread of the *difference* is smaller than the two unpaired error bars whenever the runs err
on the same images. Reads the ``per_image_counts.npz`` that ``python -m eval.linprobe``
writes beside ``results.json`` (with ``--bootstrap`` > 0, the default); each run contributes
its best learning rate, as in its own table. Runs whose validation images or masks differ (the
``data_digest`` of their files' contents) are refused.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from dino_skipless.cli import ArgumentParser, add_debug_arg, cli_main, flag
from dino_skipless.digest import require_same_data
from dino_skipless.fileio import markdown_table, write_report
from dino_skipless.outdir import check_out_file, report_stage
from dino_skipless.ranges import AT_LEAST_1, NON_NEGATIVE

from .linprobe_lib import STAGE
from .metrics import paired_bootstrap_miou


def load_counts(path: str | Path, probe: str) -> tuple[np.ndarray, str, dict]:
    """``(N, C, 3)`` per-image counts of one probe, the validation digest and results.json."""
    folder = Path(path)
    if folder.name in ("results.json", "per_image_counts.npz"):
        folder = folder.parent
    npz, res = folder / "per_image_counts.npz", folder / "results.json"
    if not npz.is_file():
        raise ValueError(
            f"{npz} not found: compare the --out folder of a python -m eval.linprobe run "
            "(one folder per checkpoint under a --sweep-ckpts run) made with --bootstrap > 0"
        )
    try:
        with np.load(npz) as z:
            if probe not in z.files:
                probes = [k for k in z.files if k not in ("val_digest", "run_id")]
                raise ValueError(f"{npz}: no '{probe}' probe (this run has {probes}); use --probe")
            counts, digest = z[probe], str(z["val_digest"])
            counts_id = str(z["run_id"]) if "run_id" in z.files else None
    except (OSError, KeyError, zipfile.BadZipFile) as e:  # not an npz, or not the probe's
        raise ValueError(f"{npz}: not a per_image_counts.npz of eval.linprobe ({e})") from None
    if counts.ndim != 3 or counts.shape[-1] != 3:
        raise ValueError(f"{npz}: '{probe}' is not an (images, classes, 3) count array")
    try:
        result = json.loads(res.read_text("utf-8")) if res.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{res}: not a readable results.json") from None
    if not isinstance(result, dict) or report_stage(result) not in (None, STAGE):
        raise ValueError(f"{res} was not written by eval.linprobe")
    if result and result.get("run_id") != counts_id:
        raise ValueError(
            f"{npz} (run {counts_id}) and {res} (run {result.get('run_id')}) were written by "
            "different eval.linprobe runs into the same --out; rerun the probe into that folder "
            "(it replaces both) or into a fresh one"
        )
    return counts, digest, result


def compare_runs(a: str, b: str, probe: str = "single", n_boot: int = 10000, seed: int = 0) -> dict:
    ca, da, ra = load_counts(a, probe)
    cb, db, rb = load_counts(b, probe)
    if da != db:
        raise ValueError(
            "the two runs were not scored on the same validation images (target digests differ): "
            "use the same --dataset/--root/--resolution/--synthetic-* options for both"
        )
    # and the content of the validation image and mask files (runs before it: masks only)
    warning = require_same_data(
        (ra.get("data_digest") or {}).get("val"),
        (rb.get("data_digest") or {}).get("val"),
        "use the same --dataset/--root/--synthetic-* options for both",
    )
    out = paired_bootstrap_miou(ca, cb, n_boot, seed)

    def probe_result(r: dict) -> dict:
        if r.get("probe", "single") == probe:
            return r
        return r.get(probe, {}) if isinstance(r.get(probe), dict) else {}

    pa, pb = probe_result(ra), probe_result(rb)
    return out | {
        "probe": probe,
        "n_images": int(ca.shape[0]),
        "label_a": ra.get("label", str(a)),
        "label_b": rb.get("label", str(b)),
        "layers_a": pa.get("layers"),
        "layers_b": pb.get("layers"),
        "best_lr_a": pa.get("best_lr"),
        "best_lr_b": pb.get("best_lr"),
        "unpaired_se_a": pa.get("miou_se"),
        "unpaired_se_b": pb.get("miou_se"),
        "data_warning": warning,
    }


def render(r: dict) -> str:
    headers = ["probe", "A", "B", "mIoU A", "mIoU B", "A - B", "paired s.e.", "95 % CI", "p"]
    row = [
        r["probe"],
        r["label_a"],
        r["label_b"],
        r["miou_a"],
        r["miou_b"],
        r["diff"],
        r["se"],
        f"[{r['lo']:.2f}, {r['hi']:.2f}]",
        r["p"],
    ]
    p_floor = 2 / max(r["n_boot"], 1)
    note = (
        f"\n{r['n_images']} paired validation images, {r['n_boot']} bootstrap resamples "
        f"(p = 0 means below {p_floor:.1g})."
    )
    return markdown_table(headers, [row]) + note + "\n"


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n")[0])
    p.add_argument("a", help="run A: eval.linprobe --out folder (or its results.json)")
    p.add_argument("b", help="run B (e.g. the random-init baseline)")
    p.add_argument("--probe", default="single", choices=["single", "multiscale"])
    p.add_argument(
        "--n-boot", type=flag(int, AT_LEAST_1), default=10000, help="bootstrap resamples"
    )
    p.add_argument("--seed", type=flag(int, NON_NEGATIVE), default=0)
    p.add_argument("--out", default=None, help="write the comparison here (.json, .md beside it)")
    add_debug_arg(p)
    args = p.parse_args(argv)
    if args.out:
        check_out_file(Path(args.out).with_suffix(".json"))
    try:
        r = compare_runs(args.a, args.b, args.probe, args.n_boot, args.seed)
    except ValueError as e:
        raise SystemExit(f"eval.compare: {e}") from None
    if r["data_warning"]:
        print(f"warning: {r['data_warning']}", file=sys.stderr)
    text = render(r)
    print(text, end="")
    if args.out:
        write_report(args.out, r | {"a": args.a, "b": args.b}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
