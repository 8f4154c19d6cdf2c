"""DINO parameter groups and optimiser construction."""

from __future__ import annotations

import pytest
import torch

from dino_skipless.models import build_model
from dino_skipless.optim import (
    OPTIMIZERS,
    SOAP,
    AdamWConfig,
    SOAPConfig,
    build_optimizer,
    get_param_groups,
)


def test_param_groups_follow_official_dino_rule():
    depth = 2
    model = build_model("vit_mini", "skipless_init", depth=depth)
    model.cls_token.requires_grad_(False)  # frozen params are skipped
    groups = get_param_groups(model)
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    reg = {id(p) for p in groups[0]["params"]}
    noreg = {id(p) for p in groups[1]["params"]}
    named = dict(model.named_parameters())
    # hand enumeration: per block qkv, proj, fc1, fc2 weights; plus pos_embed (3-D) and patch conv
    want_reg = {"pos_embed", "patch_embed.proj.weight"} | {
        f"blocks.{i}.{n}.weight"
        for i in range(depth)
        for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    # biases of every Linear/conv and LayerNorm weights+biases (norm1, norm2 per block, final norm)
    want_noreg = {"patch_embed.proj.bias", "norm.weight", "norm.bias"} | {
        f"blocks.{i}.{n}"
        for i in range(depth)
        for n in (
            "attn.qkv.bias",
            "attn.proj.bias",
            "mlp.fc1.bias",
            "mlp.fc2.bias",
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
        )
    }
    assert reg == {id(named[n]) for n in want_reg}
    assert noreg == {id(named[n]) for n in want_noreg}
    assert len(reg) == 2 + 4 * depth and len(noreg) == 3 + 8 * depth


def test_build_adamw_keeps_groups_and_is_not_fused_on_cpu():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer("AdamW", get_param_groups(model), lr=0.0, weight_decay=0.04)
    assert isinstance(opt, torch.optim.AdamW)
    assert not opt.param_groups[0].get("fused")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    assert opt.param_groups[0]["betas"] == AdamWConfig().betas == (0.9, 0.999)


def test_build_soap_uses_config_and_unknown_name_is_rejected():
    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(
        "soap", get_param_groups(model), soap=SOAPConfig(precondition_frequency=7)
    )
    assert isinstance(opt, SOAP)
    g = opt.param_groups[0]
    assert g["precondition_frequency"] == 7 and g["betas"] == (0.95, 0.95)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="adamw"):
        build_optimizer("lamb", get_param_groups(model))
    assert OPTIMIZERS == ("adamw", "soap")
