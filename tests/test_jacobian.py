"""Jacobian conditioning: closed forms (Eq. 13), independent autograd references, paths agree."""

import json

import numpy as np
import pytest
import torch
from scipy.special import softmax
from timm.models.vision_transformer import Attention

from dino_skipless.jacobian import main
from dino_skipless.jacobian_lib import (
    _float64_copy,
    attention_map,
    default_layers,
    full_jacobian_condition,
    gaussian_tokens,
    layer_condition_numbers,
    prop1_demo,
    sa_extremes,
)
from dino_skipless.models import build_model, set_skip


def _tiny(variant, **kw):
    kw = {"depth": 2, "embed_dim": 16, "num_heads": 2, **kw}
    return build_model("vit_mini", variant, seed=0, **kw).eval()


def _commutation(n, d):
    # T vec(X) = vec(X^T) for X (n x d), column-major vec
    t = np.zeros((n * d, n * d))
    for i in range(n):
        for j in range(d):
            t[i * d + j, j * n + i] = 1.0
    return t


def test_single_head_jacobian_equals_eq13_closed_form():
    """K = (X W_V W_O (x) I_n)^T A' + (W_V W_O)^T (x) A, column-major vec (paper Eq. 13)."""
    n, d = 5, 6
    torch.manual_seed(0)
    attn = Attention(d, num_heads=1, qkv_bias=True)
    with torch.no_grad():
        attn.qkv.bias.zero_()
        attn.proj.bias.zero_()
    a64 = _float64_copy(attn, "cpu")
    x = gaussian_tokens((n, d), 1)
    jac = torch.func.jacrev(attention_map(a64))(x).numpy()  # [i, a, j, b] = dY_ia / dX_jb
    k_torch = jac.transpose(1, 0, 3, 2).reshape(n * d, n * d)  # -> column-major vec indices

    w = attn.qkv.weight.detach().double().numpy()  # nn.Linear stores W^T
    wq, wk, wv = w[:d].T, w[d : 2 * d].T, w[2 * d :].T  # paper convention X W
    wo = attn.proj.weight.detach().double().numpy().T
    xs = x.numpy()
    s = d**-0.5
    p = wq @ wk.T
    a = softmax(s * xs @ p @ xs.T, axis=1)
    eye_n = np.eye(n)
    # d vec(M) = s [(X P^T (x) I) + (I (x) X P) T] d vec(X)
    dm = s * (np.kron(xs @ p.T, eye_n) + np.kron(eye_n, xs @ p) @ _commutation(n, d))
    # row-wise softmax: dA_ij = A_ij (dM_ij - sum_k A_ik dM_ik), vec index j*n + i
    jsm = np.zeros((n * n, n * n))
    for i in range(n):
        for j in range(n):
            jsm[j * n + i, j * n + i] += a[i, j]
            for k in range(n):
                jsm[j * n + i, k * n + i] -= a[i, j] * a[i, k]
    a_prime = jsm @ dm
    wvo = wv @ wo
    k_closed = np.kron(xs @ wvo, eye_n).T @ a_prime + np.kron(wvo.T, a)
    np.testing.assert_allclose(k_torch, k_closed, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("variant", ["skip", "skipless_init"])
def test_layer_kappa_matches_independent_autograd(variant):
    """Multi-head timm module (fused attention, as in the model) via autograd.functional."""
    model = _tiny(variant)
    rec = layer_condition_numbers(model, n_tokens=6, layers=[1], seed=3, method="exact")[0]
    attn = model.blocks[1].attn
    x = gaussian_tokens((6, 16), 3)
    ref = _float64_copy(attn, "cpu")
    ref.fused_attn = True
    jac = torch.autograd.functional.jacobian(lambda t: ref(t[None])[0], x).reshape(96, 96)
    if variant == "skip":  # with a residual the map is K + I
        jac = jac + torch.eye(96, dtype=jac.dtype)
    s = np.linalg.svd(jac.numpy(), compute_uv=False)
    assert rec["matrix"] == ("K+I" if variant == "skip" else "K")
    assert rec["smax"] == pytest.approx(s[0], rel=1e-10)
    assert rec["smin"] == pytest.approx(s[-1], rel=1e-8)
    assert rec["kappa"] == pytest.approx((s[0] / s[-1]) ** 2, rel=1e-7)


def test_skip_flag_switches_k_plus_identity():
    model = _tiny("skip")
    with_skip = layer_condition_numbers(model, 6, [0], method="exact")[0]
    without = layer_condition_numbers(set_skip(model, False), 6, [0], method="exact")[0]
    assert with_skip["matrix"] == "K+I" and without["matrix"] == "K"
    assert with_skip["kappa"] != pytest.approx(without["kappa"], rel=1e-3)


@pytest.mark.parametrize("variant", ["skip", "skipless_init"])
def test_layer_exact_and_matrix_free_agree(variant):
    model = _tiny(variant, embed_dim=32, num_heads=4)
    ex = layer_condition_numbers(model, 8, [1], seed=1, method="exact")
    it = layer_condition_numbers(model, 8, [1], seed=1, method="iterative")
    for e, i in zip(ex, it, strict=True):
        assert e["method"] == "exact" and i["method"] == "iterative"
        assert abs(i["smax"] - e["smax"]) / e["smax"] < 1e-3
        assert abs(i["smin"] - e["smin"]) / e["smin"] < 1e-3


@pytest.mark.parametrize("variant", ["skip", "skipless_init"])
def test_full_exact_and_matrix_free_agree(variant):
    model = _tiny(variant)
    ex = full_jacobian_condition(model, n_tokens=3, batch=2, method="exact")
    it = full_jacobian_condition(model, n_tokens=3, batch=2, method="iterative")
    assert (ex["method"], it["method"]) == ("exact", "iterative")
    assert ex["rows"] == 2 * 3 * 16 and ex["n_params"] == sum(
        p.numel() for p in model.blocks.parameters()
    )
    assert abs(it["smax"] - ex["smax"]) / ex["smax"] < 1e-3
    assert abs(it["smin"] - ex["smin"]) / ex["smin"] < 1e-3
    assert it["kappa"] == pytest.approx(ex["kappa"], rel=2e-3)


def test_full_exact_matches_manual_parameter_jacobian():
    """J from per-output backward passes (no torch.func) gives the same kappa(J J^T)."""
    model = _tiny("skipless_init", depth=1)
    res = full_jacobian_condition(model, n_tokens=3, batch=2, seed=0, method="exact")
    blocks = _float64_copy(model.blocks, "cpu")
    params = list(blocks.parameters())
    for p in params:
        p.requires_grad_(True)
    x = gaussian_tokens((2, 3, 16), 1)  # full_jacobian_condition draws with seed + 1
    out = blocks(x).reshape(-1)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)])
            for o in out]  # fmt: skip
    s = np.linalg.svd(torch.stack(rows).numpy(), compute_uv=False)
    assert res["kappa"] == pytest.approx((s[0] / s[-1]) ** 2, rel=1e-6)


def test_skipless_default_init_is_numerically_singular():
    # Same structure as ViT-S (6 heads, timm init), narrower so the exact path takes a second.
    # (The paper init's kappa depends on the head width: the ViT-S numbers come from the CLI.)
    kw = {"embed_dim": 96, "num_heads": 6, "depth": 1}
    k = {
        v: layer_condition_numbers(_tiny(v, **kw), 8, [0], method="exact")[0]["kappa"]
        for v in ("skip", "skipless")
    }
    assert 1.0 < k["skip"] < 6.0
    assert k["skipless"] > 1e10


def test_vit_small_skip_layer_matrix_free():
    """ViT-S/16 at init, 16 tokens: kappa((K+I)(K+I)^T) of a skip block is a few units."""
    model = build_model("vit_small", "skip", seed=0).eval()
    rec = layer_condition_numbers(model, 16, [0], seed=0, method="iterative")[0]
    assert rec["d"] == 384 and rec["converged"]
    assert 1.5 < rec["kappa"] < 6.0


def test_prop1_peak_vs_diffuse_matches_numpy():
    out = prop1_demo(alpha=0.1, beta_peak=5.0, beta_diffuse=0.0, n=10, seed=0)
    assert 1.0 <= out["peak_kappa"] <= 1.5
    assert out["diffuse_kappa"] > 100
    for key in ("peak", "diffuse"):
        s = np.asarray(out[f"{key}_matrix"])
        np.testing.assert_allclose(s.sum(1), 1.0, rtol=1e-12)
        sv = np.linalg.svd(s, compute_uv=False)
        assert out[f"{key}_kappa"] == pytest.approx(sv[0] / sv[-1], rel=1e-9)
    peak = np.asarray(out["peak_matrix"])
    assert (np.diag(peak) > 0.9).all()  # diagonal dominance -> near identity


def test_default_layers():
    assert default_layers(12) == [0, 4, 7, 11]
    assert default_layers(6)[0] == 0 and default_layers(6)[-1] == 5
    assert default_layers(1) == [0]


def test_cli_writes_json_table_and_png(tmp_path, capsys):
    out = tmp_path / "jac"
    args = ["--arch", "vit_mini", "--depth", "2", "--tokens", "4", "--variant", "skip"]
    args += ["--variant", "skipless_init", "--full", "--prop1", "--seed", "1", "--out", str(out)]
    args += ["--max-iter", "20"]
    main(args)
    text = (out / "jacobian.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    recs = data["records"]
    assert {(r["variant"], r["layer"]) for r in recs} == {
        (v, i) for v in ("skip", "skipless_init") for i in (0, 1)
    }
    for r in recs:
        assert {"variant", "layer", "kappa", "smax", "smin", "method"} <= r.keys()
        assert r["method"] == "exact" and r["kappa"] == pytest.approx((r["smax"] / r["smin"]) ** 2)
    assert data["full"]["method"] in ("exact", "iterative") and data["full"]["kappa"] > 1
    assert data["full"]["variant"] == "skip"
    assert set(data["full_by_variant"]) == {"skip", "skipless_init"}
    assert data["prop1"]["peak_kappa"] < data["prop1"]["diffuse_kappa"]
    assert (out / "jacobian.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| variant | L0 | L1 |" in printed and "exact" in printed


def test_cli_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="out of range"):
        main(["--arch", "vit_mini", "--depth", "2", "--variant", "skip", "--layers", "5",
              "--tokens", "2", "--out", str(tmp_path)])  # fmt: skip
    with pytest.raises(SystemExit):
        main(["--variant", "nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="valid"):
        sa_extremes(None, torch.zeros(2, 2), False, method="dense")


def test_cli_width_and_heads_overrides(tmp_path):
    """--embed-dim/--num-heads build the ablation model the CLI says (head dim = d / heads)."""
    out = tmp_path / "jac"
    main(["--arch", "vit_mini", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
          "--tokens", "3", "--variant", "skipless_init", "--out", str(out)])  # fmt: skip
    data = json.loads((out / "jacobian.json").read_text())
    spec = data["specs"]["skipless_init"]
    assert (spec["embed_dim"], spec["num_heads"]) == (32, 2)
    rec = data["records"][0]
    assert rec["d"] == 32 and rec["n_tokens"] == 3
    # the same numbers as the library on the model the flags describe
    model = build_model("vit_mini", "skipless_init", depth=1, embed_dim=32, num_heads=2)
    ref = layer_condition_numbers(model, n_tokens=3, layers=[0], method="exact")[0]
    assert rec["kappa"] == pytest.approx(ref["kappa"], rel=1e-9)
