"""Frozen feature extraction shared by every evaluation stage (linear probe, TokenCut, PCA, k-NN).

One forward pass up to the deepest requested block returns, for each requested block, the
block's output tokens (``kind='tokens'``) or the queries / keys / values its attention computes
(``kind='q'|'k'|'v'``, heads concatenated, as TokenCut and LOST use them). Blocks are indexed
from 0 (block 11 is the last block of ViT-S).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

FEATURE_KINDS = ("tokens", "q", "k", "v")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_layers(model: nn.Module, layers: Sequence[int]) -> list[int]:
    """Normalise block indices (negative counts from the end) or fail with the valid range."""
    depth = len(model.blocks)
    out = []
    for layer in layers:
        li = int(layer)
        if not -depth <= li < depth:
            raise ValueError(
                f"block index {layer} out of range: this backbone has {depth} blocks, "
                f"valid indices are 0..{depth - 1} (or -{depth}..-1)"
            )
        out.append(li % depth)
    return out


def check_input_size(model: nn.Module, height: int, width: int) -> None:
    p = patch_size(model)
    if height % p or width % p:
        raise ValueError(
            f"input size {height}x{width} is not a multiple of the patch size {p}; "
            f"use a resolution divisible by {p} (or pad, as TokenCut does)"
        )


def patch_size(model: nn.Module) -> int:
    ps = model.patch_embed.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


@dataclass
class Features:
    """Per-block features of a batch: ``tokens[layer]`` is ``(B, 1 + h*w, D)`` (cls first)."""

    tokens: dict[int, torch.Tensor]
    grid: tuple[int, int]  # (h, w) patch grid
    num_prefix_tokens: int = 1
    # ``(B, 1 + h*w, D)``: the tokens entering the first block (patch embedding + positional
    # embedding), when ``extract(..., with_embedding=True)``
    embedding: torch.Tensor | None = None

    def patches(self, layer: int) -> torch.Tensor:
        """``(B, h*w, D)``: patch tokens only (cls dropped)."""
        return self.tokens[layer][:, self.num_prefix_tokens :]

    def patch_grid(self, layer: int) -> torch.Tensor:
        """``(B, D, h, w)``: patch tokens as a feature map."""
        x = self.patches(layer)
        b, _, d = x.shape
        return x.transpose(1, 2).reshape(b, d, *self.grid)

    def cls(self, layer: int) -> torch.Tensor:
        return self.tokens[layer][:, 0]


def _qkv(block: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    attn = block.attn
    b, n, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, -1)
    idx = {"q": 0, "k": 1, "v": 2}[kind]
    out = qkv[:, :, idx]  # (B, N, H, dh)
    # timm may normalise q/k per head (qk_norm); identity for the paper's ViTs.
    if kind == "q":
        out = attn.q_norm(out.transpose(1, 2)).transpose(1, 2)
    elif kind == "k":
        out = attn.k_norm(out.transpose(1, 2)).transpose(1, 2)
    return out.reshape(b, n, -1)


@torch.no_grad()
def extract(
    model: nn.Module,
    images: torch.Tensor,
    layers: Sequence[int],
    kind: str = "tokens",
    norm: bool = False,
    with_embedding: bool = False,
) -> Features:
    """Run ``model`` on ``images`` (B, 3, H, W; normalised) and collect block features.

    ``norm=True`` applies the final LayerNorm to ``tokens`` (as DINO's
    ``get_intermediate_layers`` does for linear evaluation); it is ignored for q/k/v, which are
    computed from the block's own pre-attention LayerNorm. ``with_embedding=True`` also keeps
    the tokens entering the first block (``Features.embedding``, never normed).
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; valid kinds: {', '.join(FEATURE_KINDS)}")
    layers = check_layers(model, layers)
    h, w = images.shape[-2:]
    check_input_size(model, h, w)
    p = patch_size(model)
    wanted = set(layers)
    last = max(wanted)
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    embedding = x if with_embedding else None
    out: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(model.blocks):
        if i in wanted and kind != "tokens":
            out[i] = _qkv(blk, x, kind)
        x = blk(x)
        if i in wanted and kind == "tokens":
            out[i] = model.norm(x) if norm else x
        if i == last:
            break
    return Features(
        tokens=out,
        grid=(h // p, w // p),
        num_prefix_tokens=getattr(model, "num_prefix_tokens", 1),
        embedding=embedding,
    )


def normalize_image(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` RGB batch -> ImageNet-normalised batch."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std
