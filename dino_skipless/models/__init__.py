"""Backbones: ViT with a ``skip`` switch, named configs, checkpoint loading."""

from .loading import (
    SAFE_GLOBALS,
    TRUST_HELP,
    CheckpointError,
    infer_spec,
    load_backbone,
    load_state_dict_strict,
    resolve_checkpoint,
    safe_torch_load,
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
    "SAFE_GLOBALS",
    "TRUST_HELP",
    "resolve_checkpoint",
    "safe_torch_load",
    "set_skip",
]
