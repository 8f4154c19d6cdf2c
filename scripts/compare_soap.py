"""Compare our SOAP (dino_skipless.optim.SOAP) with the SOAP of the PyPI package pytorch-optimizer.

Not a dependency of the project: install it somewhere aside to run this, e.g.
    pip install --no-deps --target .pyopt pytorch-optimizer==4.1.0
    PYTHONPATH=.:.pyopt python scripts/compare_soap.py --steps 50

Both optimisers train identical copies of a small model (conv patch embed, LayerNorm, Linear
layers: 4-D, 2-D and 1-D parameters) on the same seeded data with the official SOAP defaults plus
a per-step lr / weight-decay schedule as DINO sets them. Prints, per step checkpoint, the max abs
parameter difference and the max relative difference, as a Markdown table.

Known source of difference: pytorch-optimizer 4.1.0 runs the QR of the eigenbasis refresh in
float32 even for float64 parameters, so in float64 the two agree to ~1e-13 until the first refresh
(step precondition_frequency + 1) and then differ at the float32 level. In float32, SOAP's first
updates are ~lr * sign(g') per eigen-coordinate, so coordinates with |g'| ~ eps amplify rounding.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import sys

import torch
from torch import nn

from dino_skipless.optim import SOAP, SOAPConfig, get_param_groups


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # B, N, C
        x = self.norm(x).mean(1)
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def run(opt_factory, model, steps, data, record):
    opt = opt_factory(get_param_groups(model))
    out = {}
    for t in range(steps):
        x, y = data[t]
        lr = 3e-3 * (0.5 + 0.5 * (t + 1) / steps)  # varies every step, as DINO's schedules
        wd = 0.04 + 0.36 * t / steps
        for i, g in enumerate(opt.param_groups):
            g["lr"] = lr
            if i == 0:
                g["weight_decay"] = wd
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if t + 1 in record:
            out[t + 1] = [p.detach().clone() for p in model.parameters()]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--precondition-frequency", type=int, default=SOAPConfig.precondition_frequency)
    args = ap.parse_args(argv)
    try:
        from pytorch_optimizer import SOAP as PyPISOAP
    except ImportError:
        print("pytorch-optimizer is not installed; see this script's docstring", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model = TinyNet().to(dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)
    data = [
        (
            torch.randn(8, 3, 16, 16, generator=gen, dtype=dtype),
            torch.randint(0, 10, (8,), generator=gen),
        )
        for _ in range(args.steps)
    ]
    cfg = SOAPConfig(precondition_frequency=args.precondition_frequency)
    record = sorted({1, 2, 5, 10, 11, 20, 21, args.steps} & set(range(1, args.steps + 1)))

    def ours(groups):
        return SOAP(groups, lr=3e-3, weight_decay=0.01, **vars(cfg))

    def pypi(groups):
        return PyPISOAP(
            groups,
            lr=3e-3,
            betas=cfg.betas,
            shampoo_beta=None if cfg.shampoo_beta < 0 else cfg.shampoo_beta,
            weight_decay=0.01,
            precondition_frequency=cfg.precondition_frequency,
            max_precondition_dim=cfg.max_precond_dim,
            merge_dims=cfg.merge_dims,
            precondition_1d=cfg.precondition_1d,
            correct_bias=cfg.correct_bias,
            normalize_gradient=cfg.normalize_grads,
            data_format=cfg.data_format,
            eps=cfg.eps,
        )

    a = run(ours, copy.deepcopy(model), args.steps, data, record)
    b = run(pypi, copy.deepcopy(model), args.steps, data, record)
    init = [p.detach() for p in model.parameters()]
    version = importlib.metadata.version("pytorch-optimizer")
    print(
        f"pytorch-optimizer {version}, dtype {args.dtype}, steps {args.steps}, "
        f"precondition_frequency {cfg.precondition_frequency}"
    )
    print("| step | max abs param diff | max rel diff (vs max abs change from init) |")
    print("|---:|---:|---:|")
    for t in record:
        diff = max((x - y).abs().max().item() for x, y in zip(a[t], b[t]))
        moved = max((x - p0).abs().max().item() for x, p0 in zip(a[t], init))
        print(f"| {t} | {diff:.3e} | {diff / max(moved, 1e-30):.3e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
