"""Jacobian conditioning of (skipless) ViTs: paper Sec. 4-5, App. A.4.1 and A.7 (Tables 5-6).

``python -m dino_skipless.jacobian --arch vit_small --tokens 16 --prop1 --full --out DIR`` runs
it (``dino_skipless.jacobian``); this module is the analysis.

What is measured (and the choices made where the paper leaves room)
- Per layer (Table 6): ``K_l``, the Jacobian of the self-attention map ``X -> Attention_l(X)``
  (timm ``block.attn``: qkv Linear with bias, ``1/sqrt(d_h)`` scale, softmax, head concat,
  output projection with bias) w.r.t. its ``n x d`` input tokens, *without* the LayerNorm in
  front of it (a LayerNorm Jacobian is singular by construction). ``X ~ N(0, I)`` drawn once
  from ``seed`` and shared by every layer and variant, so numbers are paired. ``M = K_l + I``
  for blocks with a skip, ``M = K_l`` without; ``kappa = kappa(M M^T) = (s_max / s_min)^2``.
- Full network (Table 5): ``J = dF/dtheta`` for ``F`` = the stack of transformer blocks only
  (no patch embedding, no head and no final LayerNorm, whose Jacobian would make ``J J^T``
  singular for every variant) on ``m`` examples of ``n`` tokens ``~ N(0, I)``; ``theta`` = all
  block parameters; ``kappa = kappa(J J^T) = (s_max / s_min)^2`` of ``J`` (``m n d <= p``).
- Prop. 1 / Fig. 5: ``kappa(S)`` = ``s_max / s_min`` (not squared: that is what reproduces the
  paper's ~1.1 and ~730) of ``S = rowsoftmax(alpha Z + beta I)``, ``Z`` 10x10 truncated normal
  (``N(0, 1)`` cut at +-2 std, torch's ``trunc_normal_``, the "truncated normal" of A.4.1).

Methods: ``exact`` forms the dense Jacobian in float64 with ``torch.func.jacrev`` and takes
``svdvals`` (``eigvalsh`` of the Gram above ``SVD_MAX_DIM``, 5x faster); ``iterative`` is
matrix-free (JVP/VJP products; Golub-Kahan-Lanczos for ``K``, Lanczos on ``J J^T`` for the full
network), see ``dino_skipless.linalg``. ``auto`` = exact when the matrix is small enough.

JSON: ``kappa`` is always a finite float. A numerically singular map (``singular: true``, shown
as ``inf`` in the table) keeps the computed ratio, capped at 1e300; for those, the value only
says "astronomically large" (it is rounding noise over ``s_max``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .fileio import markdown_table, write_report
from .linalg import (
    EPS64,
    extreme_singular_values,
    golub_kahan_extremes,
    kappa_gram,
    lanczos_extremes,
)
from .models import VARIANTS, build_model, load_backbone


@dataclass(frozen=True)
class JacobianConfig:
    """Defaults of the analysis (paper A.7 / A.4.1 where it states them)."""

    n_tokens: int = 16  # issue 3: "16 input tokens drawn N(0, I)"
    batch: int = 2  # m examples for the full Jacobian (Sec. 4.1)
    table6_layers: tuple[int, ...] = (0, 4, 7, 11)  # Table 6 columns, for 12 blocks
    exact_max_dim: int = 8192  # K_l exact when n*d <= this (ViT-S, 16 tokens: 6144)
    svd_max_dim: int = 4096  # above: eigvalsh(M^T M) instead of svdvals (52 s vs 10 s at 6144)
    full_exact_max_entries: int = 20_000_000  # dense J (m n d x p) float64: 160 MB
    max_iter: int = 300  # Krylov iterations (matrix-free)
    tol: float = 1e-8  # residual / s_max at which Krylov stops
    prop1_alpha: float = 0.1  # Fig. 5
    prop1_beta_peak: float = 5.0
    prop1_beta_diffuse: float = 0.0
    prop1_n: int = 10
    kappa_inf_display: float = 1e16  # table shows "inf" for singular maps


CFG = JacobianConfig()
METHODS = ("auto", "exact", "iterative")


def default_layers(depth: int) -> list[int]:
    """Table 6's layers 0, 4, 7, 11 for 12 blocks; the same relative depths otherwise."""
    if depth == 12:
        return list(CFG.table6_layers)
    return sorted({round(i * (depth - 1) / 11) for i in CFG.table6_layers})


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return method


def _float64_copy(module: nn.Module, device) -> nn.Module:
    m = copy.deepcopy(module).to(device=device, dtype=torch.float64).eval()
    for sub in m.modules():
        if hasattr(sub, "fused_attn"):
            sub.fused_attn = False  # explicit softmax path: forward-mode AD everywhere
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def gaussian_tokens(shape: Sequence[int], seed: int, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)


def attention_map(attn: nn.Module):
    """``X (n, d) -> attn(X) (n, d)`` for a float64 copy of a timm ``Attention``."""

    def f(x: torch.Tensor) -> torch.Tensor:
        return attn(x.unsqueeze(0)).squeeze(0)

    return f


def sa_extremes(
    attn: nn.Module,
    x: torch.Tensor,
    skip: bool,
    method: str = "auto",
    cfg: JacobianConfig = CFG,
    seed: int = 0,
):
    """Extreme singular values of ``M = K (+ I if skip)`` for one attention module at ``x``.

    ``attn`` must already be a float64 module on ``x``'s device (see ``_float64_copy``).
    """
    check_method(method)
    n, d = x.shape
    dim = n * d
    f = attention_map(attn)
    use_exact = method == "exact" or (method == "auto" and dim <= cfg.exact_max_dim)
    if use_exact:
        jac = torch.func.jacrev(f, chunk_size=1024)(x).reshape(dim, dim)
        if skip:
            jac = jac + torch.eye(dim, dtype=jac.dtype, device=jac.device)
        return extreme_singular_values(jac, gram=dim > cfg.svd_max_dim)
    _, vjp_fn = torch.func.vjp(f, x)
    shift = 1.0 if skip else 0.0

    def matvec(v):
        return torch.func.jvp(f, (x,), (v.view(n, d),))[1].reshape(-1) + shift * v

    def rmatvec(u):
        return vjp_fn(u.view(n, d))[0].reshape(-1) + shift * u

    return golub_kahan_extremes(
        matvec, rmatvec, dim, dim, max_iter=cfg.max_iter, tol=cfg.tol, seed=seed,
        device=x.device,
    )  # fmt: skip


def _blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"expected a ViT with .blocks (timm VisionTransformer), got {type(model)}")
    return blocks


def _variant_of(model: nn.Module) -> str | None:
    spec = getattr(model, "spec", None)
    return getattr(spec, "variant", None)


def layer_condition_numbers(
    model: nn.Module,
    n_tokens: int = CFG.n_tokens,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    method: str = "auto",
    device=None,
    cfg: JacobianConfig = CFG,
    progress: bool = False,
) -> list[dict]:
    """Table 6: ``kappa(M M^T)`` per layer, ``M = K_l + I`` (block with skip) or ``K_l``.

    Works on any timm ViT whose blocks have ``.attn`` (and ``.skip``; default True, timm's
    residual block). The model is not modified (float64 copies of the attention modules).
    """
    blocks = _blocks(model)
    depth = len(blocks)
    layers = default_layers(depth) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has blocks 0..{depth - 1}")
    if device is None:
        device = next(model.parameters()).device
    d = blocks[0].attn.qkv.in_features
    x = gaussian_tokens((n_tokens, d), seed, device)
    out = []
    it = layers
    if progress:
        it = tqdm(layers, desc=f"K_l {_variant_of(model) or ''}".strip(), leave=False)
    for layer in it:
        blk = blocks[layer]
        skip = bool(getattr(blk, "skip", True))
        attn = _float64_copy(blk.attn, device)
        t0 = time.perf_counter()
        ext = sa_extremes(attn, x, skip, method, cfg, seed=seed)
        rec = {
            "variant": _variant_of(model),
            "layer": int(layer),
            "kappa": kappa_gram(ext.smax, ext.smin),
            "smax": ext.smax,
            "smin": ext.smin,
            "method": ext.method,
            "singular": bool(ext.singular),
            "matrix": "K+I" if skip else "K",
            "n_tokens": int(n_tokens),
            "d": int(d),
            "iters": ext.iters,
            "converged": bool(ext.converged),
            "smin_resid": ext.smin_resid,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        out.append(rec)
    return out


def blocks_function(model: nn.Module, device):
    """``(f, params)``: ``f(params, X) = blocks(X)`` (float64, no final norm), ``X (m, n, d)``."""
    blocks = _float64_copy(_blocks(model), device)
    params = {k: v.detach() for k, v in blocks.named_parameters()}

    def f(p, x):
        return torch.func.functional_call(blocks, p, (x,))

    return f, params


def full_jacobian_condition(
    model: nn.Module,
    n_tokens: int = CFG.n_tokens,
    batch: int = CFG.batch,
    seed: int = 0,
    method: str = "auto",
    device=None,
    cfg: JacobianConfig = CFG,
    progress: bool = False,
) -> dict:
    """Table 5: ``kappa(J J^T)`` of ``J = dF/dtheta`` (blocks only, ``m n d`` rows, ``p`` cols)."""
    check_method(method)
    if device is None:
        device = next(model.parameters()).device
    f, params = blocks_function(model, device)
    d = _blocks(model)[0].attn.qkv.in_features
    x = gaussian_tokens((batch, n_tokens, d), seed + 1, device)  # not the K_l tokens
    rows = batch * n_tokens * d
    p = sum(v.numel() for v in params.values())
    use_exact = method == "exact" or (method == "auto" and rows * p <= cfg.full_exact_max_entries)
    t0 = time.perf_counter()

    def fp(pp):
        return f(pp, x).reshape(-1)

    if use_exact:
        jac = torch.func.jacrev(fp)(params)
        mat = torch.cat([jac[k].reshape(rows, -1) for k in params], dim=1)
        ext = extreme_singular_values(mat)
        smax, smin, singular = ext.smax, ext.smin, ext.singular or rows > p
        info = {"method": "exact", "iters": 0, "converged": True, "smin_resid": 0.0}
    else:
        _, vjp_fn = torch.func.vjp(fp, params)

        def gram_matvec(u):
            g = vjp_fn(u)[0]
            return torch.func.jvp(fp, (params,), (g,))[1]

        bar = None
        cb = None
        if progress:
            bar = tqdm(total=min(cfg.max_iter, rows), desc="Lanczos J J^T", leave=False)

            def cb(k, lmax, lmin):
                bar.update(k - bar.n)
                bar.set_postfix(kappa=f"{lmax / max(lmin, 1e-300):.3g}")

        eig = lanczos_extremes(
            gram_matvec, rows, max_iter=cfg.max_iter, tol=cfg.tol, seed=seed, device=device,
            progress=cb,
        )  # fmt: skip
        if bar is not None:
            bar.close()
        smax = math.sqrt(max(eig.lmax, 0.0))
        smin = math.sqrt(max(eig.lmin, 0.0))
        singular = eig.lmin <= rows * EPS64 * eig.lmax or rows > p
        info = {
            "method": "iterative",
            "iters": eig.iters,
            "converged": bool(eig.converged),
            "lmin_resid": eig.lmin_resid,
            "lmax_resid": eig.lmax_resid,
        }
    return {
        "variant": _variant_of(model),
        "kappa": kappa_gram(smax, smin),
        "smax": smax,
        "smin": smin,
        "singular": bool(singular),
        **info,
        "rows": rows,
        "n_params": p,
        "batch": batch,
        "n_tokens": n_tokens,
        "d": d,
        "depth": len(_blocks(model)),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def truncated_normal(shape: Sequence[int], gen: torch.Generator, cut: float = 2.0) -> torch.Tensor:
    """``N(0, 1)`` conditioned on ``|z| <= cut`` (rejection; torch<2.2 trunc_normal_ has no rng)."""
    z = torch.randn(*shape, generator=gen, dtype=torch.float64)
    while (bad := z.abs() > cut).any():
        z[bad] = torch.randn(int(bad.sum()), generator=gen, dtype=torch.float64)
    return z


def softmax_condition(m: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(kappa(S), S)`` with ``S = rowsoftmax(m)`` and ``kappa = s_max / s_min``."""
    s = torch.softmax(m.to(torch.float64), dim=-1)
    sv = torch.linalg.svdvals(s)
    return float(sv[0] / sv[-1]), s


def prop1_demo(
    alpha: float = CFG.prop1_alpha,
    beta_peak: float = CFG.prop1_beta_peak,
    beta_diffuse: float = CFG.prop1_beta_diffuse,
    n: int = CFG.prop1_n,
    seed: int = 0,
) -> dict:
    """Prop. 1 / Fig. 5: ``kappa(rowsoftmax(alpha Z + beta I))``, one ``Z`` for both cases."""
    gen = torch.Generator().manual_seed(seed)
    z = truncated_normal((n, n), gen)
    eye = torch.eye(n, dtype=torch.float64)
    k_peak, s_peak = softmax_condition(alpha * z + beta_peak * eye)
    k_diff, s_diff = softmax_condition(alpha * z + beta_diffuse * eye)
    return {
        "peak_kappa": k_peak,
        "diffuse_kappa": k_diff,
        "alpha": alpha,
        "beta_peak": beta_peak,
        "beta_diffuse": beta_diffuse,
        "n": n,
        "seed": seed,
        "kappa_definition": "s_max/s_min of the softmax matrix",
        "peak_matrix": s_peak.tolist(),
        "diffuse_matrix": s_diff.tolist(),
    }


# ----------------------------------------------------------------------------------- reporting


def fmt_kappa(rec: dict) -> str:
    if rec.get("singular") or rec["kappa"] >= CFG.kappa_inf_display:
        return "inf"
    k = rec["kappa"]
    return f"{k:.3g}" if k < 1e4 else f"{k:.2e}"


def kappa_table(records: list[dict]) -> str:
    """Markdown in the layout of Table 6: one row per variant, one column per layer."""
    layers = sorted({r["layer"] for r in records})
    variants = list(dict.fromkeys(r["label"] for r in records))
    rows = []
    for v in variants:
        cells = {r["layer"]: fmt_kappa(r) for r in records if r["label"] == v}
        rows.append([v, *(cells.get(i, "") for i in layers)])
    return markdown_table(["variant", *(f"L{i}" for i in layers)], rows)


def plot(path: Path, records: list[dict], prop1: dict | None) -> None:
    # matplotlib only here: the trainer imports this module for its condition numbers
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3 if prop1 else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4))
    axes = list(axes) if ncols > 1 else [axes]
    ax = axes[0]
    cap = 20.0  # singular maps are drawn at 1e20 with an "inf" label
    for label in dict.fromkeys(r["label"] for r in records):
        rs = sorted((r for r in records if r["label"] == label), key=lambda r: r["layer"])
        ys = [min(math.log10(r["kappa"]), cap) if not r["singular"] else cap for r in rs]
        (line,) = ax.plot([r["layer"] for r in rs], ys, marker="o", label=label)
        for r, y in zip(rs, ys, strict=True):
            if r["singular"]:
                ax.annotate("inf", (r["layer"], y), color=line.get_color(), fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("log10 kappa(M M^T)")
    ax.set_title("self-attention Jacobian (M = K, or K + I with skip)")
    ax.legend(fontsize=8)
    if prop1:
        for ax, key, beta in (
            (axes[1], "peak", prop1["beta_peak"]),
            (axes[2], "diffuse", prop1["beta_diffuse"]),
        ):
            im = ax.imshow(prop1[f"{key}_matrix"], cmap="viridis")
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(
                f"{key}: alpha={prop1['alpha']}, beta={beta}\nkappa={prop1[f'{key}_kappa']:.4g}"
            )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- stage


def analysis_models(
    ckpt: str | None = None,
    trust: bool = False,
    variants: Sequence[str] | None = None,
    arch: str = "vit_small",
    seed: int = 0,
    ckpt_variant: str | None = None,
    **build_kw,
) -> list[tuple[nn.Module, str, dict]]:
    """``[(model, variant, spec dict)]``: the checkpoint ``ckpt`` (its own arch/variant;
    ``ckpt_variant`` for a plain state dict), else a fresh ``arch`` per variant (``"all"`` =
    every variant); ``build_kw`` go to ``build_model``."""
    if ckpt:
        model, spec = load_backbone(ckpt, trust=trust, variant=ckpt_variant)
        return [(model, spec.variant, spec.to_dict())]
    variants = variants or ["all"]
    if "all" in variants:
        variants = list(VARIANTS)
    out = []
    for v in dict.fromkeys(variants):
        m = build_model(arch, v, seed=seed, **build_kw).eval()
        out.append((m, v, m.spec.to_dict()))
    return out


def _method_note(method: str, n_tokens: int, d: int, cfg: JacobianConfig) -> str:
    dim = n_tokens * d
    if method != "auto":
        return f"{method} (--method)"
    if dim > cfg.exact_max_dim:
        return f"iterative (n*d = {dim} > {cfg.exact_max_dim})"
    how = "svdvals" if dim <= cfg.svd_max_dim else "eigvalsh of M^T M"
    return f"exact (n*d = {dim} <= {cfg.exact_max_dim}; {how})"


def analyse(
    models,
    n_tokens: int,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    method: str = "auto",
    device="cpu",
    cfg: JacobianConfig = CFG,
    *,
    full: bool = False,
    batch: int = CFG.batch,
    prop1: bool = False,
    head: dict | None = None,
) -> dict:
    """The ``jacobian.json`` record: per-layer kappa of every model (``records``), with ``full``
    the whole network's (``full``: the first model, ``full_by_variant``: all), with ``prop1``
    the softmax demo. ``head``: entries put first (command, arch, ...)."""
    records: list[dict] = []
    full_by_variant: dict[str, dict] = {}
    for model, variant, _spec in models:
        depth = len(model.blocks)
        d = model.blocks[0].attn.qkv.in_features
        why = _method_note(method, n_tokens, d, cfg)
        print(f"[{variant}] K_l: {depth} blocks, d={d}, {n_tokens} tokens -> {why}")
        try:
            recs = []
            for layer in tqdm(
                default_layers(depth) if layers is None else layers, desc=f"{variant} layers"
            ):
                recs += layer_condition_numbers(model, n_tokens, [layer], seed, method, device, cfg)
        except ValueError as e:
            raise SystemExit(f"--layers: {e}") from None
        for r in recs:
            r["variant"] = variant
            r["label"] = variant
        records += recs
        if full:
            res = full_jacobian_condition(
                model, n_tokens, batch, seed, method, device, cfg, progress=True
            )
            res["variant"] = variant
            full_by_variant[variant] = res
            print(
                f"[{variant}] J: {res['rows']} x {res['n_params']} -> {res['method']} "
                f"({res['seconds']:.1f} s, {res['iters']} iters)"
            )
    result: dict = {
        **(head or {}),
        "seed": seed,
        "specs": {v: s for _, v, s in models},
        "records": records,
    }
    if full:
        result["full"] = full_by_variant[next(iter(full_by_variant))]  # the first (stable)
        result["full_by_variant"] = full_by_variant
    if prop1:
        result["prop1"] = prop1_demo(seed=seed)
    return result


def report_text(result: dict) -> str:
    """The printed tables: Table 6 layout, Table 5 layout with ``full``, the Prop. 1 line."""
    parts = [
        "\nkappa(M M^T) per layer (M = K + I with skip, K without; Table 6 layout)",
        kappa_table(result["records"]),
    ]
    if "full_by_variant" in result:
        rows = [
            [v, fmt_kappa(r), f"{r['smax']:.4g}", f"{r['smin']:.4g}", r["method"], r["iters"]]
            for v, r in result["full_by_variant"].items()
        ]
        parts += [
            "\nkappa(J J^T), full network w.r.t. parameters (Table 5 layout)",
            markdown_table(["variant", "kappa", "s_max", "s_min", "method", "iters"], rows),
        ]
    if "prop1" in result:
        p = result["prop1"]
        parts.append(
            f"\nProp. 1: kappa(softmax) peak (beta={p['beta_peak']}) = "
            f"{p['peak_kappa']:.4g}, diffuse (beta={p['beta_diffuse']}) = "
            f"{p['diffuse_kappa']:.4g}  (paper: ~1.1 and ~730)"
        )
    return "\n".join(parts)


def write_outputs(out_dir: str | Path, result: dict, text: str) -> None:
    """``jacobian.json`` + ``jacobian.md`` (the printed tables) and ``jacobian.png``."""
    out_dir = Path(out_dir)
    write_report(out_dir / "jacobian", result, text.lstrip("\n") + "\n")
    plot(out_dir / "jacobian.png", result["records"], result.get("prop1"))
