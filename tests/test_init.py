import math

import numpy as np
import pytest
import torch

from dino_skipless.init import (
    PAPER_INIT_DEFAULTS,
    InitConfig,
    mimetic_qk,
    scale_corrected_orthogonal,
    scaled_orthonormal_vo,
)
from dino_skipless.models import build_model


def test_paper_defaults():
    assert InitConfig() == InitConfig(alpha=1.8, beta=1.0, c=3.0)
    assert PAPER_INIT_DEFAULTS["supervised_vit_base"] == {"alpha": 2.0, "beta": 0.6, "c": 3.0}
    assert PAPER_INIT_DEFAULTS["language"]["alpha"] == 0.0


def test_vo_product_is_scaled_orthonormal():
    g = torch.Generator().manual_seed(0)
    wv, wo = scaled_orthonormal_vo(48, c=3.0, generator=g)
    s = torch.linalg.svdvals(wv @ wo)
    assert torch.allclose(s, torch.full_like(s, 9.0), rtol=1e-10)  # all equal c^2
    # each factor is c times an orthogonal matrix
    assert torch.allclose(wv.T @ wv, 9.0 * torch.eye(48, dtype=wv.dtype), atol=1e-10)


def _truncate(m: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_qk_heads_are_rank_dh_truncations_of_mimetic_target():
    d, h = 32, 4
    g = torch.Generator().manual_seed(1)
    wq, wk, targets = mimetic_qk(d, h, alpha=1.8, beta=1.0, generator=g)
    dh = d // h
    for i in range(h):
        prod = (wq[:, i * dh : (i + 1) * dh] @ wk[:, i * dh : (i + 1) * dh].T).numpy()
        ref = _truncate(targets[i].numpy(), dh)
        np.testing.assert_allclose(prod, ref, atol=1e-10)
        assert np.linalg.matrix_rank(prod) == dh
    # the targets are alpha Z + beta I with Z ~ N(0, 1/d): check the off-diagonal spread
    z = (targets - torch.eye(d, dtype=targets.dtype)) / 1.8
    assert abs(z.std().item() - 1 / math.sqrt(d)) < 0.15 / math.sqrt(d)


def test_mlp_weights_are_scale_corrected_orthogonal():
    g = torch.Generator().manual_seed(2)
    w1 = scale_corrected_orthogonal(64, 16, g)  # fc1: expanding, scale sqrt(64/16) = 2
    w2 = scale_corrected_orthogonal(16, 64, g)  # fc2: contracting, scale 1
    assert torch.allclose(w1.T @ w1, 4.0 * torch.eye(16, dtype=w1.dtype), atol=1e-10)
    assert torch.allclose(w2 @ w2.T, torch.eye(16, dtype=w2.dtype), atol=1e-10)


def test_init_written_into_model_with_transposes():
    m = build_model("vit_mini", "skipless_init", depth=2, alpha=1.8, beta=1.0, c=3.0)
    d, h = m.embed_dim, m.blocks[0].attn.num_heads
    assert (d, h) == (128, 2)  # vit_mini: 2 heads of 64, like ViT-S
    for blk in m.blocks:
        a = blk.attn
        wv = a.qkv.weight[2 * d :].T.double()  # paper's W^V (d x d)
        wo = a.proj.weight.T.double()  # paper's W^O
        s = torch.linalg.svdvals(wv @ wo)
        assert torch.allclose(s, torch.full_like(s, 9.0), rtol=1e-5)
        wq, wk = a.qkv.weight[:d].T.double(), a.qkv.weight[d : 2 * d].T.double()
        dh = d // h
        for i in range(h):
            prod = wq[:, i * dh : (i + 1) * dh] @ wk[:, i * dh : (i + 1) * dh].T
            assert torch.linalg.matrix_rank(prod, rtol=1e-5).item() == dh
            # diagonally dominant on average: trace ~ beta * dh, off-diagonal small
            assert prod.diagonal().sum() > 0.5 * dh
        for lin in (a.qkv, a.proj, blk.mlp.fc1, blk.mlp.fc2):
            assert torch.count_nonzero(lin.bias) == 0
        w1 = blk.mlp.fc1.weight.double()
        assert torch.allclose(w1.T @ w1, 4.0 * torch.eye(d, dtype=w1.dtype), atol=1e-4)


def _attention_maps(attn, x):
    b, n, d = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    return ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)


@pytest.mark.parametrize("variant,dominant", [("skipless_init", True), ("skipless", False)])
def test_attention_at_init_diagonally_dominant_only_with_paper_init(variant, dominant):
    m = build_model("vit_small", variant, depth=2)
    x = torch.randn(4, 16, 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = _attention_maps(m.blocks[0].attn, x)
    diag = a.diagonal(dim1=-2, dim2=-1)
    if dominant:
        assert diag.mean() > 0.9
        offdiag_max = (a - torch.diag_embed(diag)).amax(-1)
        assert (diag > offdiag_max).float().mean() > 0.99
    else:
        # default (timm) init: near-uniform rows, every entry close to 1/n
        assert (a - 1 / 16).abs().max() < 0.05
