"""Paired comparison of two TokenCut runs on the same images (exact McNemar test).

    python -m tokencut.compare runs/tc_pretrained runs/tc_random [--out cmp.json]

Is checkpoint A's CorLoc really above B's (say, pretrained vs the same architecture at random
init), or within noise? Both runs saw the same images, so the right test is paired: only the
images that one run localises and the other does not carry information. Runs whose
``data_digest`` (content of the image files and of the ground truth scored) differ are refused,
whatever their image ids say. Each run contributes
its reported block (``best_layer`` of a ``--sweep-layers`` run, else ``layer``) unless
``--layer-a/--layer-b`` pick one; every block the two runs share is also compared block by block.
Note that each run's best block is chosen on the same images it is scored on, so with a
sweep of L blocks a cautious reader multiplies the best-block p-value by L (Bonferroni).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from dino_skipless.cli import ArgumentParser, add_debug_arg, cli_main, flag
from dino_skipless.digest import require_same_data
from dino_skipless.fileio import markdown_table, write_report
from dino_skipless.outdir import check_out_file, report_stage

from .corloc import mcnemar_exact
from .pipeline import STAGE

IOU_THRESHOLD = 0.5  # CorLoc's threshold


@dataclass(frozen=True)
class PairedCorLoc:
    layer_a: int
    layer_b: int
    n_images: int
    corloc_a: float  # percent
    corloc_b: float
    only_a: int  # images A localises and B does not
    only_b: int
    p_value: float  # two-sided exact McNemar

    @property
    def diff(self) -> float:
        return self.corloc_a - self.corloc_b


def paired_corloc(
    ious_a: dict[str, float], ious_b: dict[str, float], layers=(0, 0)
) -> PairedCorLoc:
    """Compare per-image best IoUs (``image id -> IoU``) of two runs on the same image set."""
    if ious_a.keys() != ious_b.keys():
        only_a = sorted(ious_a.keys() - ious_b.keys())
        only_b = sorted(ious_b.keys() - ious_a.keys())
        raise ValueError(
            "the two runs were not evaluated on the same images "
            f"({len(only_a)} only in A, e.g. {only_a[:3]}; {len(only_b)} only in B, e.g. "
            f"{only_b[:3]}): use the same --dataset/--root/--synthetic-* options for both"
        )
    if not ious_a:
        raise ValueError("no images to compare")
    hit_a = {k: v >= IOU_THRESHOLD for k, v in ious_a.items()}
    hit_b = {k: v >= IOU_THRESHOLD for k, v in ious_b.items()}
    n = len(hit_a)
    only_a = sum(hit_a[k] and not hit_b[k] for k in hit_a)
    only_b = sum(hit_b[k] and not hit_a[k] for k in hit_a)
    return PairedCorLoc(
        layer_a=layers[0],
        layer_b=layers[1],
        n_images=n,
        corloc_a=100.0 * sum(hit_a.values()) / n,
        corloc_b=100.0 * sum(hit_b.values()) / n,
        only_a=only_a,
        only_b=only_b,
        p_value=mcnemar_exact(only_a, only_b),
    )


def per_image_ious(result: dict, layer: int, source: str = "run") -> dict[str, float]:
    """``image id -> best IoU`` of one block from a ``tokencut.run`` results.json."""
    per_image = result.get("per_image")
    if not per_image:
        raise ValueError(
            f"{source}: results.json has no 'per_image' entries (a trimmed copy?); compare the "
            "results.json that python -m tokencut.run wrote"
        )
    out = {}
    for rec in per_image:
        by_layer = rec.get("best_iou_per_layer")
        if by_layer is not None:
            if str(layer) not in by_layer:
                raise ValueError(
                    f"{source}: block {layer} was not evaluated (blocks: {sorted(by_layer, key=int)})"
                )
            out[rec["image"]] = float(by_layer[str(layer)])
        elif layer == result.get("layer"):
            out[rec["image"]] = float(rec["best_iou"])
        else:
            raise ValueError(
                f"{source}: only block {result.get('layer')} was evaluated, not {layer}"
            )
    return out


def layers_of(result: dict) -> list[int]:
    per_layer = result.get("per_layer")
    return sorted(int(k) for k in per_layer) if per_layer else [int(result["layer"])]


def reported_layer(result: dict) -> int:
    return int(result["best_layer"] if result.get("best_layer") is not None else result["layer"])


SAME_DATA_HINT = "use the same --dataset/--root/--synthetic-*/--no-hard options for both"


def same_ground_truth(a: dict, b: dict) -> None:
    """The check left for runs written before ``data_digest``: every shared image's size and
    ground-truth boxes agree (the images themselves cannot be compared)."""
    gt_b = {r["image"]: (r.get("size"), r.get("gt_boxes")) for r in b.get("per_image") or []}
    for r in a.get("per_image") or []:
        other = gt_b.get(r["image"])
        if other is not None and other != (r.get("size"), r.get("gt_boxes")):
            raise ValueError(
                "the two runs were not made on the same data (the ground truth or size of "
                f"image {r['image']} differs): {SAME_DATA_HINT}"
            )


def compare(a: dict, b: dict, layer_a: int | None = None, layer_b: int | None = None) -> dict:
    """The headline comparison (reported or chosen blocks) and the block-by-block ones; runs
    made on other images or ground truth (``data_digest``) are refused."""
    la = reported_layer(a) if layer_a is None else layer_a
    lb = reported_layer(b) if layer_b is None else layer_b
    head = paired_corloc(per_image_ious(a, la, "A"), per_image_ious(b, lb, "B"), (la, lb))
    warning = require_same_data(a.get("data_digest"), b.get("data_digest"), SAME_DATA_HINT)
    if warning:
        same_ground_truth(a, b)
    shared = sorted(set(layers_of(a)) & set(layers_of(b)))
    blocks = [
        paired_corloc(per_image_ious(a, li, "A"), per_image_ious(b, li, "B"), (li, li))
        for li in shared
    ]
    return {
        "reported": asdict(head) | {"diff": head.diff},
        "per_block": [asdict(r) | {"diff": r.diff} for r in blocks],
        "n_blocks_a": len(layers_of(a)),
        "n_blocks_b": len(layers_of(b)),
        "data_warning": warning,
    }


def _load(path: str) -> dict:
    """A ``tokencut.run`` results.json (or its folder); anything else is refused by name."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise SystemExit(f"no TokenCut results at {p} (expected OUT/results.json of tokencut.run)")
    try:
        result = json.loads(p.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"{p}: not a readable results.json ({e.__class__.__name__})") from None
    stage = report_stage(result)
    if stage != STAGE:
        what = f"written by {stage}" if stage else "not written by tokencut.run"
        raise SystemExit(f"{p} is {what}: compare the --out folders of two tokencut.run runs")
    if not isinstance(result.get("per_image"), list) or "layer" not in result:
        raise SystemExit(
            f"{p}: a tokencut.run results.json without its 'per_image' and 'layer' entries (a "
            "trimmed copy?); compare the file that tokencut.run wrote"
        )
    return result


def _label(result: dict, path: str) -> str:
    ckpt = result.get("ckpt")
    if isinstance(ckpt, str) and ckpt.startswith("random-"):
        return ckpt  # a random-init baseline: say which variant
    return Path(path).name


def render(report: dict, name_a: str, name_b: str) -> str:
    h = report["reported"]
    rows = [
        [
            f"{h['layer_a']} / {h['layer_b']} (reported)",
            h["corloc_a"],
            h["corloc_b"],
            h["diff"],
            f"{h['only_a']} / {h['only_b']}",
            h["p_value"],
        ]
    ]
    rows += [
        [
            str(r["layer_a"]),
            r["corloc_a"],
            r["corloc_b"],
            r["diff"],
            f"{r['only_a']} / {r['only_b']}",
            r["p_value"],
        ]
        for r in report["per_block"]
    ]
    headers = [
        "block",
        f"CorLoc {name_a}",
        f"CorLoc {name_b}",
        "diff",
        "only A / only B",
        "McNemar p",
    ]
    n_sweep = max(report["n_blocks_a"], report["n_blocks_b"])
    note = (
        f"\n{h['n_images']} paired images. The reported row compares each run's reported block; "
        + (
            f"a best block picked from {n_sweep} inflates its p-value up to {n_sweep}x.\n"
            if n_sweep > 1
            else "\n"
        )
    )
    return markdown_table(headers, rows) + note


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m tokencut.compare", description=__doc__.split("\n")[0])
    p.add_argument("a", help="run A: tokencut.run --out folder or its results.json")
    p.add_argument("b", help="run B (e.g. the random-init baseline)")
    p.add_argument("--layer-a", type=flag(int), default=None, help="block of A (default: reported)")
    p.add_argument("--layer-b", type=flag(int), default=None, help="block of B (default: reported)")
    p.add_argument("--out", default=None, help="write the comparison here (.json, .md beside it)")
    add_debug_arg(p)
    args = p.parse_args(argv)
    if args.out:
        check_out_file(Path(args.out).with_suffix(".json"))
    a, b = _load(args.a), _load(args.b)
    try:
        report = compare(a, b, args.layer_a, args.layer_b)
    except (ValueError, KeyError, TypeError) as e:  # the checks in compare, or a damaged file
        raise SystemExit(f"tokencut.compare: {e}") from None
    if report["data_warning"]:
        print(f"warning: {report['data_warning']}", file=sys.stderr)
    text = render(report, _label(a, args.a), _label(b, args.b))
    print(text)
    if args.out:
        write_report(args.out, report | {"a": args.a, "b": args.b}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
