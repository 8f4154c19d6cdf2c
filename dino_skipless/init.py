"""The paper's initialisation for skipless transformers (Ji et al. 2025, Section 5).

Every function here is pure given a ``torch.Generator``: it returns tensors and never touches a
module, so the properties the paper relies on can be tested in isolation. ``apply_paper_init``
is the only function that writes into a model.

Conventions. The paper writes ``Q = X W^Q`` with ``W^Q`` of shape ``(d, d_h)``; ``nn.Linear``
computes ``x @ weight.T``, so a Linear's ``weight`` is the *transpose* of the paper's matrix.
All helpers below return matrices in the paper's convention and the writer transposes once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Defaults per experiment, as published (Sec. 6.1, 6.2, A.8). ``dino_vit_small`` is our default.
PAPER_INIT_DEFAULTS: dict[str, dict[str, float]] = {
    "dino_vit_small": {"alpha": 1.8, "beta": 1.0, "c": 3.0},
    "supervised_vit_base": {"alpha": 2.0, "beta": 0.6, "c": 3.0},
    "language": {"alpha": 0.0, "beta": 0.5, "c": 3.0},
}


@dataclass(frozen=True)
class InitConfig:
    """Constants of the paper's init: ``W_Q W_K^T = alpha Z + beta I`` and ``W_V W_O = c^2 O``."""

    alpha: float = 1.8
    beta: float = 1.0
    c: float = 3.0


def scaled_orthonormal_vo(
    d: int, c: float, generator: torch.Generator | None = None, dtype=torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 5.1: draw ``Q ~ N(0, 1)^{d x d}``, ``Q = U S V^T``; ``W_V = c U``, ``W_O = c V^T``.

    ``W_V W_O = c^2 U V^T`` is orthogonal up to the scale ``c^2``, so all its singular values
    equal ``c^2`` and ``kappa(W_V W_O) = 1``.
    """
    q = torch.randn(d, d, generator=generator, dtype=dtype)
    u, _, vh = torch.linalg.svd(q)
    return c * u, c * vh


def mimetic_qk(
    d: int,
    num_heads: int,
    alpha: float,
    beta: float,
    generator: torch.Generator | None = None,
    dtype=torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sec. 5.2 / Eq. 11, per head: ``W_Q^i W_K^i^T`` = rank-``d_h`` truncation of ``alpha Z_i + beta I``.

    ``Z_i`` has i.i.d. ``N(0, 1/d)`` entries (a fresh draw per head). A ``d x d`` target cannot
    be reached exactly with ``d x d_h`` factors, so (as in mimetic init, Trockman & Kolter 2023)
    we take its SVD ``U S V^T`` and split the top ``d_h`` singular values evenly:
    ``W_Q^i = U_k sqrt(S_k)``, ``W_K^i = V_k sqrt(S_k)``; by Eckart-Young the product is the best
    rank-``d_h`` approximation of the target.

    Returns ``(W_Q, W_K, targets)``: ``W_Q, W_K`` of shape ``(d, d)`` with head ``i`` in columns
    ``i*d_h:(i+1)*d_h`` (the paper's convention), and the per-head targets ``(h, d, d)``.
    """
    if d % num_heads:
        raise ValueError(f"embed dim {d} is not divisible by num_heads {num_heads}")
    dh = d // num_heads
    eye = torch.eye(d, dtype=dtype)
    z = torch.randn(num_heads, d, d, generator=generator, dtype=dtype) / math.sqrt(d)
    targets = alpha * z + beta * eye
    u, s, vh = torch.linalg.svd(targets)  # batched over heads: one LAPACK call per model block
    root = s[:, :dh].sqrt().unsqueeze(1)  # (h, 1, dh)
    # (h, d, dh) factors -> heads side by side in columns, the paper's (d, d) layout
    wq = (u[:, :, :dh] * root).permute(1, 0, 2).reshape(d, d)
    wk = (vh[:, :dh].transpose(1, 2) * root).permute(1, 0, 2).reshape(d, d)
    return wq, wk, targets


def scale_corrected_orthogonal(
    fan_out: int, fan_in: int, generator: torch.Generator | None = None, dtype=torch.float64
) -> torch.Tensor:
    """Scale-corrected uniform orthogonal init (Martens et al. 2021) as an ``nn.Linear`` weight.

    A Haar-uniform (semi-)orthogonal ``(fan_out, fan_in)`` matrix times
    ``sqrt(max(1, fan_out / fan_in))``: an expanding layer (fc1, d -> 4d) preserves the squared
    norm of its input on average instead of shrinking it by ``fan_in / fan_out``.
    """
    rows, cols = max(fan_out, fan_in), min(fan_out, fan_in)
    a = torch.randn(rows, cols, generator=generator, dtype=dtype)
    q, r = torch.linalg.qr(a)
    # Sign fix makes Q Haar-distributed (QR alone biases the signs of R's diagonal).
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    w = q if fan_out >= fan_in else q.T
    return w * math.sqrt(max(1.0, fan_out / fan_in))


@torch.no_grad()
def init_attention_(attn: nn.Module, cfg: InitConfig, generator: torch.Generator | None) -> None:
    """Write the paper's init into a timm ``Attention`` (fused ``qkv`` Linear + ``proj``)."""
    d = attn.qkv.in_features
    h = attn.num_heads
    wq, wk, _ = mimetic_qk(d, h, cfg.alpha, cfg.beta, generator)
    wv, wo = scaled_orthonormal_vo(d, cfg.c, generator)
    dtype = attn.qkv.weight.dtype
    # Linear weights are the transposes of the paper's matrices; rows of qkv are [q; k; v].
    attn.qkv.weight.copy_(torch.cat([wq.T, wk.T, wv.T], dim=0).to(dtype))
    attn.proj.weight.copy_(wo.T.to(dtype))
    for lin in (attn.qkv, attn.proj):
        if lin.bias is not None:
            lin.bias.zero_()


@torch.no_grad()
def init_mlp_(mlp: nn.Module, generator: torch.Generator | None) -> None:
    for lin in (mlp.fc1, mlp.fc2):
        w = scale_corrected_orthogonal(lin.out_features, lin.in_features, generator)
        lin.weight.copy_(w.to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.zero_()


def apply_paper_init(model: nn.Module, cfg: InitConfig | None = None, seed: int = 0) -> nn.Module:
    """Initialise every transformer block of ``model`` (anything with ``.blocks``) in place.

    Patch embedding, cls token, positional embedding and norms keep timm's defaults, as in the
    paper (only the SA and MLP weights are re-initialised).
    """
    cfg = cfg or InitConfig()
    gen = torch.Generator().manual_seed(seed)
    # Many small float64 SVD/QR calls run several times faster on one thread than contended
    # across a busy CPU's threads; the result does not depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for block in model.blocks:
            init_attention_(block.attn, cfg, gen)
            init_mlp_(block.mlp, gen)
    finally:
        torch.set_num_threads(threads)
    return model
