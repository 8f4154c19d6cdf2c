"""SOAP against a direct transcription of the algorithm (Vyas et al. 2025, Alg. 3 + official code).

The reference keeps the first moment in the original space and applies the eigenbases with
explicit mode products; the optimiser keeps it in the eigenbasis and rotates it only when the
basis changes. Float64 with well-conditioned (full-rank) statistics, so eigenvectors are unique
up to sign, to which SOAP's update is invariant.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from dino_skipless.optim import SOAP, SOAPConfig, merged_shape

B1, B2, EPS = 0.95, 0.95, 1e-8


def unfold(t, k):
    return torch.movedim(t, k, 0).reshape(t.shape[k], -1)


def mode_product(t, m, k):
    """(t x_k m)[..i..] = sum_j m[i, j] t[..j..]."""
    return torch.movedim(torch.tensordot(m, t, dims=([1], [k])), 0, k)


class ReferenceSOAP:
    """One tensor; ``precond[k]`` False leaves dim k unrotated (identity basis)."""

    def __init__(self, precond, freq, correct_bias=True):
        self.precond, self.freq, self.correct_bias = precond, freq, correct_bias
        self.t = None

    def to_eig(self, x):
        for k, q in enumerate(self.q):
            if q is not None:
                x = mode_product(x, q.T, k)
        return x

    def from_eig(self, x):
        for k, q in enumerate(self.q):
            if q is not None:
                x = mode_product(x, q, k)
        return x

    def accumulate(self, g, beta):
        for k, use in enumerate(self.precond):
            if use:
                gk = unfold(g, k)
                self.L[k] = beta * self.L[k] + (1 - beta) * gk @ gk.T

    def step(self, w, g, lr, wd):
        if self.t is None:  # initialise statistics and basis, no update
            self.t = 0
            self.L = [
                torch.zeros(n, n, dtype=g.dtype) if u else None
                for n, u in zip(g.shape, self.precond)
            ]
            self.accumulate(g, B2)
            self.q = [None if m is None else torch.linalg.eigh(m)[1].flip(1) for m in self.L]
            self.m = torch.zeros_like(g)  # original space
            self.v = torch.zeros_like(g)  # eigenbasis
            return w
        self.t += 1
        gp = self.to_eig(g)
        self.m = B1 * self.m + (1 - B1) * g
        self.v = B2 * self.v + (1 - B2) * gp**2
        n = self.from_eig(self.to_eig(self.m) / (self.v.sqrt() + EPS))
        bc = math.sqrt(1 - B2**self.t) / (1 - B1**self.t) if self.correct_bias else 1.0
        w = w - lr * bc * n
        w = w - lr * wd * w
        self.accumulate(g, B2)
        if self.t % self.freq == 0:
            for k, (m, q) in enumerate(zip(self.L, self.q)):
                if m is None:
                    continue
                order = torch.argsort(torch.diag(q.T @ m @ q), descending=True)
                self.v = self.v.index_select(k, order)
                self.q[k] = torch.linalg.qr(m @ q[:, order])[0]
        return w


def run_pair(shape, steps, freq, max_precond_dim=10000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(*shape, generator=gen, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = SOAP([p], lr=0.1, precondition_frequency=freq, max_precond_dim=max_precond_dim)
    ref = ReferenceSOAP([n <= max_precond_dim for n in shape], freq)
    w = w0.clone()
    for t in range(steps):
        g = torch.randn(*shape, generator=gen, dtype=torch.float64)
        lr, wd = 0.01 * (1 + 0.1 * t), 0.04 + 0.02 * t  # change every step, as DINO's schedules
        opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"] = lr, wd
        p.grad = g.clone()
        opt.step()
        w = ref.step(w, g, lr, wd)
        torch.testing.assert_close(p.detach(), w, rtol=1e-9, atol=1e-11, msg=f"step {t + 1}")
    return p, opt, ref


def test_matches_reference_2d_across_basis_refreshes():
    p, opt, ref = run_pair((6, 6), steps=15, freq=4)
    st = opt.state[p]
    assert st["step"] == 14  # first call only initialised
    for q, q_ref in zip(st["Q"], ref.q):
        torch.testing.assert_close(q.abs(), q_ref.abs(), rtol=1e-8, atol=1e-10)


def test_matches_reference_4d_conv_weight():
    run_pair((3, 4, 2, 2), steps=12, freq=5)


def test_dim_above_max_precond_dim_is_not_rotated():
    p, opt, _ = run_pair((4, 12), steps=8, freq=3, max_precond_dim=10)
    assert opt.state[p]["Q"][1] is None and opt.state[p]["Q"][0].shape == (4, 4)


def test_first_call_only_initialises():
    gen = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    w0 = p.detach().clone()
    g = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    opt = SOAP([p])
    p.grad = g.clone()
    opt.step()
    assert torch.equal(p.detach(), w0)  # no update, no weight decay
    st = opt.state[p]
    torch.testing.assert_close(st["GG"][0], (1 - B2) * g @ g.T)
    torch.testing.assert_close(st["GG"][1], (1 - B2) * g.T @ g)
    for m, q in zip(st["GG"], st["Q"]):
        d = q.T @ m @ q
        torch.testing.assert_close(d, torch.diag(torch.diag(d)), atol=1e-12, rtol=0)
        assert torch.all(torch.diff(torch.diag(d)) <= 1e-12)  # descending eigenvalues
    assert st["step"] == 0 and not st["exp_avg"].any()


def test_one_d_params_are_adam_with_skipped_first_step():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(7, generator=gen, dtype=torch.float64)
    p = nn.Parameter(w.clone())
    lr, wd = 0.02, 0.1
    opt = SOAP([p], lr=lr, weight_decay=wd)
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t in range(6):
        g = torch.randn(7, generator=gen, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        if t > 0:
            s = t
            m = B1 * m + (1 - B1) * g
            v = B2 * v + (1 - B2) * g * g
            w = w - lr * math.sqrt(1 - B2**s) / (1 - B1**s) * m / (v.sqrt() + EPS)
            w = w * (1 - lr * wd)
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
    assert opt.state[p]["GG"] == [None] and opt.state[p]["Q"] == [None]


@pytest.mark.parametrize("shape", [(6,), (4, 6)])
def test_weight_decay_is_decoupled_and_applied_after_update(shape):
    p = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    opt = SOAP([p], lr=0.5, weight_decay=0.3)
    p.grad = torch.randn(*shape, dtype=torch.float64)
    opt.step()  # initialises
    w = p.detach().clone()
    p.grad = torch.zeros(*shape, dtype=torch.float64)  # m = v = 0: the Adam part is exactly 0
    opt.step()
    torch.testing.assert_close(p.detach(), w - 0.5 * 0.3 * w, rtol=1e-14, atol=0)


def test_merged_shape_matches_official_rule():
    assert merged_shape([3, 4, 2, 2], 8) == [3, 8, 2]
    assert merged_shape([384, 3, 16, 16], 10000) == [1152, 256]
    assert merged_shape([384], 10000) == [384]
    assert merged_shape([20000, 3], 10000) == [20000, 3]


def test_merge_dims_equals_soap_on_merged_tensor():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64)
    a = nn.Parameter(w.clone())
    b = nn.Parameter(w.reshape(3, 8, 2).clone())
    oa = SOAP([a], merge_dims=True, max_precond_dim=8, precondition_frequency=3)
    ob = SOAP([b], max_precond_dim=8, precondition_frequency=3)
    for _ in range(8):
        g = torch.randn(3, 4, 2, 2, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.reshape(3, 8, 2).clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a.detach().reshape(3, 8, 2), b.detach(), rtol=1e-12, atol=1e-14)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 2, stride=2), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 3)
    )


def _train(model, opt, batches, start=0):
    for t, (x, y) in enumerate(batches, start):
        for i, g in enumerate(opt.param_groups):
            g["lr"] = 0.01 + 0.001 * t
            g["weight_decay"] = 0.05 if i == 0 else 0.0
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_state_dict_round_trip_resumes_bit_exactly():
    gen = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(8, 2, 4, 4, generator=gen), torch.randn(8, 3, generator=gen))
        for _ in range(10)
    ]
    kw = {"precondition_frequency": 3}
    full = _net()
    opt_full = SOAP(full.parameters(), **kw)
    _train(full, opt_full, batches)

    part = _net()
    opt = SOAP(part.parameters(), **kw)
    _train(part, opt, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = _net()
    resumed.load_state_dict(ckpt["model"])
    opt2 = SOAP(resumed.parameters(), **kw)
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, batches[5:], start=5)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.parameters(), resumed.parameters()):
        sa, sb = opt_full.state[a], opt2.state[b]
        assert sa["step"] == sb["step"] == 9
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_bf16_params_keep_float32_state_through_resume():
    p = nn.Parameter(torch.randn(4, 4).to(torch.bfloat16))
    opt = SOAP([p], precondition_frequency=2)
    for _ in range(3):
        p.grad = torch.randn(4, 4).to(torch.bfloat16)
        opt.step()
    st = opt.state[p]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == st["GG"][0].dtype == torch.float32
    q = nn.Parameter(p.detach().clone())
    opt2 = SOAP([q], precondition_frequency=2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    s2 = opt2.state[q]
    assert s2["exp_avg"].dtype == torch.float32 and torch.equal(s2["exp_avg"], st["exp_avg"])
    assert p.dtype == torch.bfloat16


def test_param_without_grad_is_untouched_and_keeps_its_own_step():
    a = nn.Parameter(torch.randn(3, 3))
    b = nn.Parameter(torch.randn(3, 3))
    b0 = b.detach().clone()
    opt = SOAP([a, b], weight_decay=0.1)
    for _ in range(3):  # like DINO's last layer in epoch 0: grad set to None
        a.grad, b.grad = torch.randn(3, 3), None
        opt.step()
    assert torch.equal(b.detach(), b0) and len(opt.state[b]) == 0
    a.grad, b.grad = torch.randn(3, 3), torch.randn(3, 3)
    opt.step()
    assert opt.state[a]["step"] == 3 and opt.state[b]["step"] == 0
    assert torch.equal(b.detach(), b0)  # its own first call only initialises


def test_soap_lowers_least_squares_loss():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 8, generator=gen)
    w_true = torch.randn(8, 4, generator=gen)
    y = x @ w_true
    w = nn.Parameter(torch.zeros(8, 4))
    opt = SOAP([w], lr=0.05, weight_decay=0.0)
    loss0 = ((x @ w - y) ** 2).mean().item()
    for _ in range(150):
        opt.zero_grad()
        loss = ((x @ w - y) ** 2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-2 * loss0


def test_config_defaults_are_official_and_bad_args_rejected():
    cfg = SOAPConfig()
    assert cfg.betas == (0.95, 0.95) and cfg.shampoo_beta == -1 and cfg.eps == 1e-8
    assert cfg.precondition_frequency == 10 and cfg.max_precond_dim == 10000
    assert not (cfg.merge_dims or cfg.precondition_1d or cfg.normalize_grads) and cfg.correct_bias
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="precondition_frequency"):
        SOAP(p, precondition_frequency=0)
    with pytest.raises(ValueError, match="data_format"):
        SOAP(p, data_format="nhwc")
    with pytest.raises(ValueError, match="betas"):
        SOAP(p, betas=(0.9, 1.0))
