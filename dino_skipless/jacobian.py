"""Jacobian condition numbers (paper Sec. 4-5, App. A.7, Tables 5-6, Fig. 5): the command line.

``python -m dino_skipless.jacobian --arch vit_small --tokens 16 --prop1 --full --out DIR``

What is measured and how: ``dino_skipless.jacobian_lib``. Writes ``DIR/jacobian.json``,
``DIR/jacobian.md`` (the printed tables) and ``DIR/jacobian.png``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .cli import (
    ArgumentParser,
    add_ckpt_variant_arg,
    add_debug_arg,
    cli_main,
    flag,
    hold_out_dir,
    resolve_device,
)
from .fileio import command_line
from .jacobian_lib import (
    CFG,
    METHODS,
    JacobianConfig,
    analyse,
    analysis_models,
    report_text,
    write_outputs,
)
from .models import ARCHS, TRUST_HELP, VARIANT_HELP, VARIANTS
from .ranges import AT_LEAST_1, NON_NEGATIVE, POSITIVE

STAGE = "dino_skipless.jacobian"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m dino_skipless.jacobian",
        description="Jacobian condition numbers: per-layer self-attention kappa(K K^T) (Table 6), "
        "full network kappa(J J^T) (Table 5), Prop. 1 softmax demo (Fig. 5).",
    )
    p.add_argument("--arch", default="vit_small", choices=sorted(ARCHS))
    p.add_argument(
        "--variant",
        action="append",
        choices=[*VARIANTS, "all"],
        help=f"repeatable; default all ({VARIANT_HELP})",
    )
    p.add_argument("--ckpt", help="analyse this checkpoint (its own arch/variant) instead")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    add_ckpt_variant_arg(p)
    p.add_argument(
        "--tokens", type=flag(int, AT_LEAST_1), default=CFG.n_tokens, help="n tokens ~ N(0, I)"
    )
    p.add_argument(
        "--layers", type=flag(int), nargs="+", help="default: Table 6's 0 4 7 11 (scaled)"
    )
    p.add_argument("--full", action="store_true", help="also kappa(J J^T) of the whole network")
    p.add_argument(
        "--batch", type=flag(int, AT_LEAST_1), default=CFG.batch, help="m examples for --full"
    )
    p.add_argument("--prop1", action="store_true", help="Prop. 1 / Fig. 5 softmax demo")
    p.add_argument("--method", default="auto", choices=METHODS)
    p.add_argument(
        "--max-iter", type=flag(int, AT_LEAST_1), default=CFG.max_iter, help="Krylov iterations"
    )
    p.add_argument("--seed", type=flag(int, NON_NEGATIVE), default=0)
    p.add_argument("--alpha", type=flag(float), help="paper init alpha (skipless_init)")
    p.add_argument("--beta", type=flag(float), help="paper init beta (skipless_init)")
    p.add_argument("--c", type=flag(float, POSITIVE), help="paper init c (skipless_init)")
    p.add_argument("--depth", type=flag(int, AT_LEAST_1))
    p.add_argument("--embed-dim", type=flag(int, AT_LEAST_1), help="override the arch's width")
    p.add_argument(
        "--num-heads",
        type=flag(int, AT_LEAST_1),
        help="override the arch's heads (head dim = embed dim / heads)",
    )
    p.add_argument("--patch-size", type=flag(int, AT_LEAST_1), default=16)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    p.add_argument("--out", required=True, help="output folder")
    add_debug_arg(p)
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    out_dir = hold_out_dir(args.out, STAGE, report="jacobian.json")
    models = analysis_models(
        args.ckpt, args.trust_checkpoint, args.variant, args.arch, args.seed,
        patch_size=args.patch_size, depth=args.depth, embed_dim=args.embed_dim,
        num_heads=args.num_heads, alpha=args.alpha, beta=args.beta, c=args.c,
        ckpt_variant=args.ckpt_variant,
    )  # fmt: skip
    head = {
        "stage": STAGE,
        "command": command_line(),
        "arch": args.arch if not args.ckpt else models[0][2]["arch"],
        "ckpt": args.ckpt,
        "n_tokens": args.tokens,
    }
    result = analyse(
        models, args.tokens, args.layers, args.seed, args.method, device,
        JacobianConfig(max_iter=args.max_iter), full=args.full, batch=args.batch,
        prop1=args.prop1, head=head,
    )  # fmt: skip
    text = report_text(result)
    print(text)
    write_outputs(out_dir, result, text)
    print(f"\nwrote {out_dir / 'jacobian.json'} and {out_dir / 'jacobian.png'}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
