"""Write a synthetic dataset in a real dataset's on-disk format: the command line.

``python -m dino_skipless.data.synthetic --out DIR --format voc|ade20k|cocostuff|coco20k|
imagefolder --n N --size S --seed K [--vary]`` writes DIR so that it is directly a ``--root`` for
the matching reader. What each format gets: ``generate.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..cli import ArgumentParser, flag
from ..outdir import OutDirError, claim_out_dir
from ..ranges import AT_LEAST_1, NON_NEGATIVE, Range
from .cache import synthetic_root as synthetic_root
from .generate import DEFAULT_N, DEFAULT_SIZE, FORMATS, generate
from .generate import SyntheticTruth as SyntheticTruth


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m dino_skipless.data.synthetic",
        description="Write a synthetic dataset in a real dataset's on-disk format.",
    )
    p.add_argument("--out", required=True, type=Path, help="output root (becomes --root)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument(
        "--n", type=flag(int, AT_LEAST_1), default=DEFAULT_N, help="number of scenes (voc: per "
        "year)"
    )  # fmt: skip
    p.add_argument(
        "--size", type=flag(int, Range(ge=16)), default=DEFAULT_SIZE, help="image side in pixels"
    )
    p.add_argument("--seed", type=flag(int, NON_NEGATIVE), default=0)
    p.add_argument("--vary", action="store_true", help="sides drawn from [0.75, 1.25] x size")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        with claim_out_dir(args.out, "dino_skipless.data.synthetic", report=None):
            info = generate(
                args.out, args.format, args.n, args.size, args.seed, vary=args.vary,
                keep_truth=False,
            )  # fmt: skip
    except (ValueError, OSError, OutDirError) as e:
        raise SystemExit(f"error: {e}") from None
    counts = ", ".join(f"{k}={v}" for k, v in info.counts.items())
    print(
        f"wrote synthetic {args.format} to {args.out} ({counts}; {args.size}px, seed "
        f"{args.seed}) in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
