"""``python -m dino_skipless.loss_curves``: Fig. 1 of the paper from any set of supervised runs.

    python -m dino_skipless.loss_curves runs/sup_vitb16_* --out results/fig1.png
    python -m dino_skipless.loss_curves runs/cpu/*_seed* --out fig1.png --smooth 10 --band sd

Each RUN is an output folder of ``python -m dino_skipless.classify``. Two panels (AdamW left,
SOAP right, as the paper), one curve per variant; runs of the same optimiser and variant with
different seeds are averaged on the steps they all logged, with a shaded band (``--band``: ± one
standard error of the mean (default), ± one standard deviation, or min-max). The loss is each
``log.jsonl`` record's mean since the previous record, ``--smooth K`` averages K records more.
Writes OUT (PNG, or PDF by its suffix), and OUT.json (every plotted number, the runs of each
curve) + OUT.md (a table: final loss per curve) beside it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .classifier.curves import BANDS, CurvesError, group_runs, plot_loss_curves, read_run
from .cli import add_debug_arg
from .fileio import command_line, markdown_table, write_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dino_skipless.loss_curves",
        description="Training-loss curves of supervised runs (the paper's Fig. 1).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders of dino_skipless.classify")
    p.add_argument("--out", required=True, help="figure path (.png or .pdf)")
    p.add_argument("--x", choices=("epoch", "step"), default="epoch", help="x axis")
    p.add_argument("--band", choices=BANDS, default="se", help="band around the seeds' mean")
    p.add_argument("--smooth", type=int, default=1, metavar="K", help="moving average of K records")
    p.add_argument("--title", default=None)
    add_debug_arg(p)
    return p


def table(drawn: dict) -> str:
    rows = []
    for name, c in drawn["curves"].items():
        rows.append(
            [name, len(c["seeds"]), c["steps"][-1], c["mean"][-1], c["lo"][-1], c["hi"][-1]]
        )
    band = {"se": "± s.e.", "sd": "± s.d.", "range": "min-max"}[drawn["band"]]
    headers = ["optimizer/variant", "seeds", "last step", "final loss", f"lo ({band})", "hi"]
    return markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.smooth < 1:
            raise CurvesError(f"--smooth must be >= 1, got {args.smooth}")
        out = Path(args.out)
        if out.suffix.lower() not in (".png", ".pdf"):
            raise CurvesError(f"--out {out}: expected a .png or .pdf path")
        groups = group_runs([read_run(r) for r in args.runs])
        drawn = plot_loss_curves(groups, out, x=args.x, band=args.band, k=args.smooth,
                                 title=args.title)  # fmt: skip
    except CurvesError as e:
        if args.debug:
            raise
        raise SystemExit(f"error: {e}\n(--debug shows the traceback)") from None
    text = table(drawn)
    write_report(out, {**drawn, "command": command_line()}, text + "\n")
    print(text)
    print(f"figure: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
