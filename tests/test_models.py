import pytest
import torch
from conftest import tiny_vit
from torch import nn

from dino_skipless.features import extract
from dino_skipless.models import ARCHS, VARIANTS, build_model, get_arch


class Zero(nn.Module):
    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def test_named_archs_match_published_shapes():
    assert get_arch("vit_small") == {"embed_dim": 384, "depth": 12, "num_heads": 6}
    assert get_arch("vit_base") == {"embed_dim": 768, "depth": 12, "num_heads": 12}
    assert get_arch("vit_tiny") == {"embed_dim": 192, "depth": 12, "num_heads": 3}
    m = build_model("vit_small", "skip")
    assert len(m.blocks) == 12 and m.embed_dim == 384 and m.blocks[0].attn.num_heads == 6
    assert m.patch_embed.patch_size == (16, 16)
    # pre-LN, cls token, learned pos-embed, final norm: the timm ViT structure stays.
    assert m.cls_token is not None and isinstance(m.norm, nn.LayerNorm)
    assert m.pos_embed.shape == (1, 1 + 14 * 14, 384) and m.pos_embed.requires_grad


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="skipless_init"):
        build_model("vit_small", "no_skip")
    with pytest.raises(ValueError, match="vit_small"):
        build_model("vit_huge", "skip")


@pytest.mark.parametrize("variant", VARIANTS)
def test_skip_switch_matches_the_variant(variant):
    m = tiny_vit(variant)
    assert all(b.skip == (variant == "skip") for b in m.blocks)
    assert m.spec.variant == variant


def test_skipless_removes_both_residuals():
    """Zero attention and MLP: a skipless block outputs zeros, a residual block the identity."""
    x = torch.randn(2, 5, 128)
    for variant in ("skipless", "skip"):
        blk = tiny_vit(variant).blocks[0]
        blk.attn = Zero()
        out_attn_only = blk(x)
        blk.mlp = Zero()
        out = blk(x)
        if variant == "skip":
            assert torch.equal(out, x)
            assert not torch.equal(out_attn_only, x)  # the MLP residual branch is live
        else:
            assert torch.equal(out, torch.zeros_like(x))
            # with only attention zeroed, the MLP sees norm2(0): output no longer depends on x
            assert torch.allclose(out_attn_only, tiny_vit(variant).blocks[0].mlp(blk.norm2(0 * x)))


def test_skipless_block_is_the_plain_composition():
    blk = tiny_vit("skipless").blocks[1]
    x = torch.randn(3, 7, 128)
    expected = blk.mlp(blk.norm2(blk.attn(blk.norm1(x))))
    assert torch.allclose(blk(x), expected, atol=1e-6)


def test_variants_share_parameters_and_keys():
    keys = {v: list(tiny_vit(v).state_dict()) for v in VARIANTS}
    assert keys["skip"] == keys["skipless"] == keys["skipless_init"]


def test_skip_and_skipless_share_default_init_for_same_seed():
    a, b = tiny_vit("skip"), tiny_vit("skipless")
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka


def test_block_outputs_and_qkv_access():
    m = tiny_vit("skipless_init")
    x = torch.randn(2, 3, 32, 48)
    feats = extract(m, x, [0, 1], "tokens")
    # manual forward through the blocks
    t = m._pos_embed(m.patch_embed(x))
    b0 = m.blocks[0](t)
    b1 = m.blocks[1](b0)
    assert torch.allclose(feats.tokens[0], b0, atol=1e-6)
    assert torch.allclose(feats.tokens[1], b1, atol=1e-6)
    assert feats.grid == (4, 6)
    assert torch.allclose(m.forward_features(x), m.norm(b1), atol=1e-6)
    # keys of block 1 = rows d..2d of qkv applied to norm1 of its input
    k = extract(m, x, [1], "k").tokens[1]
    blk = m.blocks[1]
    w, bias = blk.attn.qkv.weight[128:256], blk.attn.qkv.bias[128:256]
    assert torch.allclose(k, blk.norm1(b0) @ w.T + bias, atol=1e-5)


def test_layer_index_errors_give_valid_range():
    m = tiny_vit("skip")
    with pytest.raises(ValueError, match=r"0\.\.1"):
        extract(m, torch.randn(1, 3, 32, 32), [5])
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        extract(m, torch.randn(1, 3, 30, 32), [0])


def test_depth_override_and_every_arch_builds():
    assert len(build_model("vit_small", "skip", depth=9).blocks) == 9
    for name in ARCHS:
        assert name.startswith("vit_")
