from argparse import Namespace

import pytest
import timm
import torch

from dino_skipless.models import CheckpointError, build_model, load_backbone


def mini(variant="skip", **kw):
    return build_model("vit_mini", variant, patch_size=8, img_size=32, **kw).eval()


def _same_output(a, b):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a.forward_features(x), b.forward_features(x), atol=1e-6)


def test_exported_backbone_roundtrip(tmp_path):
    m = mini("skipless_init", depth=3)
    torch.save(m.state_dict(), tmp_path / "backbone.pt")
    m.spec.to_json(tmp_path / "backbone.json")
    for target in (tmp_path, tmp_path / "backbone.pt"):
        loaded, spec = load_backbone(target)
        assert spec == m.spec and all(not b.skip for b in loaded.blocks)
        assert _same_output(m, loaded)


def test_official_dino_checkpoint_layout(tmp_path):
    """teacher/student dicts with backbone./module. prefixes and DINO-head keys beside them."""
    m = mini("skip", depth=2)
    sd = m.state_dict()
    ckpt = {
        "teacher": {
            **{f"backbone.{k}": v for k, v in sd.items()},
            "head.mlp.0.weight": torch.ones(3),
        },
        "student": {f"module.backbone.{k}": v for k, v in sd.items()},
        "args": Namespace(arch="vit_mini", patch_size=8),
        "epoch": 300,
    }
    torch.save(ckpt, tmp_path / "checkpoint0300.pth")
    loaded, spec = load_backbone(tmp_path / "checkpoint0300.pth")
    assert spec.variant == "skip" and spec.depth == 2 and spec.patch_size == 8
    assert _same_output(m, loaded)
    # bare backbone state dict (as the DINO hub weights are distributed)
    torch.save(sd, tmp_path / "dino_vitmini8_pretrain.pth")
    loaded, _ = load_backbone(tmp_path / "dino_vitmini8_pretrain.pth")
    assert _same_output(m, loaded)


def test_timm_state_dict_loads_into_skip_variant(tmp_path):
    ref = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=10, dynamic_img_size=True
    ).eval()
    torch.save(ref.state_dict(), tmp_path / "vit_small_timm.pth")  # includes head.weight/bias
    loaded, spec = load_backbone(tmp_path / "vit_small_timm.pth")
    assert spec.arch == "vit_small" and spec.variant == "skip" and spec.depth == 12
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.forward_features(x), ref.forward_features(x), atol=1e-5)


def test_wrong_architecture_lists_mismatches(tmp_path):
    m = mini("skip", depth=2)
    torch.save(m.state_dict(), tmp_path / "backbone.pt")
    spec = mini("skip", depth=3).spec
    spec.to_json(tmp_path / "backbone.json")  # claims 3 blocks, weights have 2
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\."):
        load_backbone(tmp_path)
    wide = build_model("vit_tiny", "skip", patch_size=8, img_size=32, depth=2).spec
    wide.to_json(tmp_path / "backbone.json")
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatches: .*attn\.proj\.weight: checkpoint \(128, 128\) vs model \(192, 192\)",
    ):
        load_backbone(tmp_path)


def test_missing_checkpoint_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no backbone.pt"):
        load_backbone(tmp_path)


def test_pos_embed_resampled_for_other_grid(tmp_path):
    src = build_model("vit_mini", "skip", patch_size=8, img_size=64, depth=1)
    torch.save(src.state_dict(), tmp_path / "backbone.pt")
    spec = build_model("vit_mini", "skip", patch_size=8, img_size=32, depth=1).spec
    spec.to_json(tmp_path / "backbone.json")
    loaded, _ = load_backbone(tmp_path)
    assert loaded.pos_embed.shape == (1, 1 + 16, 128)
    assert torch.equal(loaded.pos_embed[:, 0], src.pos_embed[:, 0])  # cls position untouched
