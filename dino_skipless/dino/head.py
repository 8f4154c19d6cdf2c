"""DINO projection head and multi-crop wrapper (official ``utils.DINOHead``/``MultiCropWrapper``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .loss import KOLEO_FEATURES


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation ``W = g * v / ||v||`` (per output row).

    Written out by hand instead of ``nn.utils.weight_norm`` (deprecated) or the parametrization
    API (whose state-dict keys are ``parametrizations.weight.original0/1``): parameter names
    ``weight_g`` (out, 1) and ``weight_v`` (out, in) are exactly those of official DINO
    checkpoints, and a plain module works with deepcopy, DDP and torch.compile.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        # nn.Linear's default init for v, as upstream (weight_norm wraps a fresh nn.Linear).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm(dim=1, keepdim=True))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight g * v / ||v||_row (no eps, like torch's weight_norm)."""
        return self.weight_g * (self.weight_v / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    """MLP -> L2-normalise -> weight-normed linear to ``out_dim`` prototypes.

    Defaults: official ``DINOHead`` with the boosted ViT-S/16 recipe (out_dim 65536,
    ``--norm_last_layer false``, ``--use_bn_in_head false``, 3 layers, 2048 hidden, 256 bottleneck).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        use_bn: bool = False,
        norm_last_layer: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
        ):
            if int(value) <= 0:
                raise ValueError(f"DINOHead: {name} must be a positive int, got {value}")
        nlayers = max(int(nlayers), 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        # norm_last_layer fixes every prototype to unit norm (g frozen at 1).
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)
        self.norm_last_layer = norm_last_layer
        # fp32 under autocast: the teacher target is a softmax at T = 0.04 of these logits, and a
        # bf16 head moves it by up to 5 % (a bf16 bottleneck alone, before an fp32 last layer:
        # 4.6 %; tests/test_dino_head.py). ~1.3 % of a ViT-S/16 step's FLOPs. False: the official
        # code's head under autocast (scripts/bench_pretrain.py's official-style step).
        self.fp32 = True

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            # trunc_normal_(std=.02) with absolute bounds [-2, 2] as upstream/timm.
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self, x: torch.Tensor, return_bottleneck: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Prototype logits ``(B, K)``; with ``return_bottleneck`` also the L2-normalised
        bottleneck ``(B, bottleneck_dim)`` they are computed from."""
        if self.fp32:
            with torch.autocast(x.device.type, enabled=False):
                z = F.normalize(self.mlp(x.float()), dim=-1, p=2)
                out = self.last_layer(z)
        else:
            z = F.normalize(self.mlp(x), dim=-1, p=2)
            out = self.last_layer(z)
        return (out, z) if return_bottleneck else out


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of consecutive same-resolution crops, then the head once.

    ``backbone(x)`` must return the cls embedding (B, D) (a tuple's first item is used).
    State-dict keys are ``backbone.*`` and ``head.*`` as upstream.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        x: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
        return_features: str | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Head outputs ``(sum_crops B, K)``; with ``return_features`` also the features the
        KoLeo term reads (``dino.koleo_features``): ``"backbone"``, the backbone's CLS features
        ``(sum_crops B, D)``, or ``"bottleneck"``, the head's L2-normalised bottleneck."""
        if return_features is not None and return_features not in KOLEO_FEATURES:
            want = " or ".join(repr(f) for f in KOLEO_FEATURES)
            raise ValueError(f"return_features: {want}, got {return_features!r}")
        crops = [x] if isinstance(x, torch.Tensor) else list(x)
        if not crops:
            raise ValueError("MultiCropWrapper: got an empty list of crops")
        outputs = []
        start = 0
        # Group by the full spatial shape (upstream uses the width only; equal here for squares).
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            group = crops[start] if end - start == 1 else torch.cat(crops[start:end])
            out = self.backbone(group)
            if isinstance(out, tuple):
                out = out[0]
            outputs.append(out)
            start = end
        feats = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if return_features == "backbone":
            return self.head(feats), feats
        if return_features == "bottleneck":
            return self.head(feats, return_bottleneck=True)
        return self.head(feats)
