"""Backbones: ViT with a ``skip`` switch, named configs, checkpoint loading."""

from .loading import (
    CheckpointError,
    infer_spec,
    load_backbone,
    load_state_dict_strict,
    resolve_checkpoint,
)
from .vit import (
    ARCHS,
    VARIANT_HELP,
    VARIANTS,
    BackboneSpec,
    Block,
    build_model,
    build_vit,
    check_variant,
    get_arch,
    set_skip,
)

__all__ = [
    "ARCHS",
    "VARIANTS",
    "VARIANT_HELP",
    "BackboneSpec",
    "Block",
    "CheckpointError",
    "build_model",
    "build_vit",
    "check_variant",
    "get_arch",
    "infer_spec",
    "load_backbone",
    "load_state_dict_strict",
    "resolve_checkpoint",
    "set_skip",
]
