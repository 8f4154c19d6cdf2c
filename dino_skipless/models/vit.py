"""Vision Transformer with a ``skip`` switch, built on timm's ``VisionTransformer``.

``skip=False`` removes *both* residual connections of every block and changes nothing else:
pre-LN, cls token, learned positional embedding, final LayerNorm and timm's fused
scaled-dot-product attention all stay, so a skipless model has exactly the parameters (and
state-dict keys) of its residual twin and stays FlashAttention-compatible.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import partial

import torch
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..init import InitConfig, apply_paper_init

VARIANTS: tuple[str, ...] = ("skip", "skipless", "skipless_init")
VARIANT_HELP = (
    "skip: standard residual ViT, timm init | skipless: no residuals, timm init (fails to train) "
    "| skipless_init: no residuals + the paper's init (the method)"
)

# Named architectures: (embed_dim, depth, num_heads). ViT-S/16 is the paper's DINO backbone.
# ``vit_mini`` is not a published model: it is the CPU-sized config of quickstarts and tests.
# It keeps the paper's head dimension (64, Sec. 6.1-6.2) and shrinks the number of heads: the
# mimetic W_Q W_K^T init is a rank-d_h truncation per head, and at d_h = 32 its attention is
# far less diagonal, so kappa(K K^T) at init is ~1e3-1e9 instead of ~1e1-1e2 (README, "Why
# vit_mini has 2 heads of 64").
ARCHS: dict[str, dict[str, int]] = {
    "vit_mini": {"embed_dim": 128, "depth": 6, "num_heads": 2},
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
}


class Block(TimmBlock):
    """timm's pre-LN block; with ``skip=False`` both sub-blocks lose their residual."""

    def __init__(self, *args, skip: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = skip

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.skip:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), *args, **kwargs)))
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        else:
            x = self.drop_path1(self.ls1(self.attn(self.norm1(x), *args, **kwargs)))
            x = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def extra_repr(self) -> str:
        return f"skip={self.skip}"


@dataclass
class BackboneSpec:
    """Everything needed to rebuild a backbone; exported as ``backbone.json`` next to weights."""

    arch: str = "vit_small"
    variant: str = "skipless_init"
    patch_size: int = 16
    img_size: int = 224
    depth: int | None = None  # None: the arch's default
    embed_dim: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init: dict[str, float] = field(default_factory=lambda: asdict(InitConfig()))

    def __post_init__(self):
        check_variant(self.variant)
        base = get_arch(self.arch)
        self.depth = int(self.depth if self.depth is not None else base["depth"])
        self.embed_dim = int(self.embed_dim if self.embed_dim is not None else base["embed_dim"])
        self.num_heads = int(self.num_heads if self.num_heads is not None else base["num_heads"])
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by {self.num_heads} heads")

    @property
    def skip(self) -> bool:
        return self.variant == "skip"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BackboneSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    return variant


def get_arch(name: str) -> dict[str, int]:
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; valid archs: {', '.join(ARCHS)}")
    return ARCHS[name]


def build_vit(
    spec: BackboneSpec, seed: int | None = 0, init_weights: bool = True
) -> VisionTransformer:
    """Build the backbone described by ``spec`` (``num_classes=0``: features, no classifier).

    ``dynamic_img_size`` interpolates the positional embedding for other input sizes (96 px
    DINO local crops, TokenCut at the image's own size). Drop-path is 0 in every variant, as in
    the paper. ``seed`` makes timm's default init (and the paper's) reproducible; ``None``
    leaves the global RNG alone. ``init_weights=False`` skips the paper's init (its SVDs are
    wasted work when a checkpoint overwrites every weight right after).
    """
    if seed is not None:
        torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        num_classes=0,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=spec.qkv_bias,
        class_token=True,
        global_pool="token",
        dynamic_img_size=True,
        drop_path_rate=0.0,
        block_fn=partial(Block, skip=spec.skip),
    )
    if init_weights and spec.variant == "skipless_init":
        apply_paper_init(model, InitConfig(**spec.init), seed=0 if seed is None else seed)
    model.spec = spec  # travels with the module so features/exports know what they hold
    return model


def build_model(
    arch: str = "vit_small",
    variant: str = "skipless_init",
    *,
    seed: int | None = 0,
    **overrides,
) -> VisionTransformer:
    """``build_model('vit_small', 'skipless_init', depth=9, alpha=1.8, beta=1.0, c=3)``.

    Keyword overrides are any ``BackboneSpec`` field, or the init constants ``alpha``,
    ``beta``, ``c``.
    """
    init = asdict(InitConfig())
    for key in ("alpha", "beta", "c"):
        if key in overrides:
            value = overrides.pop(key)
            if value is not None:
                init[key] = float(value)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    spec = BackboneSpec(arch=arch, variant=variant, init=init, **overrides)
    return build_vit(spec, seed=seed)


def set_skip(model: nn.Module, skip: bool) -> nn.Module:
    """Switch every block's residuals on or off (for analysis; does not re-initialise)."""
    for blk in model.blocks:
        blk.skip = skip
    return model
