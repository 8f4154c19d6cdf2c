"""Optimisers for DINO pretraining: DINO's parameter groups, AdamW, and SOAP.

``get_param_groups`` and ``build_optimizer`` follow the official DINO code (facebookresearch/dino,
``utils.get_params_groups`` and ``main_dino.py``): the optimiser is built with placeholder lr and
weight decay, and the per-iteration schedules (``dino_skipless.dino.schedules``) overwrite every
group's ``lr`` and group 0's ``weight_decay`` before each step.

``SOAP`` is a re-implementation of the official SOAP optimiser (Vyas et al. 2025, "SOAP: Improving
and Stabilizing Shampoo using Adam", github.com/nikhilvyas/SOAP ``soap.py``): Adam run in the
eigenbasis of Shampoo's preconditioner. Behaviour reproduced from the official code:

* the first call for a parameter only initialises its statistics (``GG = (1 - beta) g g^T`` per
  dimension, ``Q`` = eigenvectors of ``GG`` by ``eigh``, descending) and does *not* update the
  parameter ("first step is skipped so that we never use the current gradients in the
  projection"); its own step counter starts at 1 on the next call. The counter is per parameter,
  so a parameter whose gradient is ``None`` (DINO's frozen last layer in epoch 0) is untouched and
  starts its own SOAP warm-up when it first gets a gradient, exactly as the official code;
* Adam moments live in the eigenbasis; bias correction is folded into the step size
  (``lr * sqrt(1 - b2^t) / (1 - b1^t)``) and ``eps`` is added to ``sqrt(v)`` (not bias corrected);
* decoupled weight decay is applied *after* the update: ``p <- p - lr * wd * p``;
* the preconditioner statistics are updated after the parameter update with the current
  gradient; every ``precondition_frequency`` steps the eigenbasis is refreshed by one power
  iteration + QR, the second moment is permuted to follow the re-sorted eigenvectors, and the first
  moment is rotated into the new basis;
* 1-D parameters (and dimensions larger than ``max_precond_dim``) are not preconditioned, so with
  ``precondition_1d=False`` biases and norm weights get plain Adam (with the same skipped first step).

Deliberate differences (documented, numerically equivalent up to float rounding): the official
code rotates the first moment back to the original space and into the eigenbasis again on *every*
step; since ``Q`` only changes every ``precondition_frequency`` steps and ``Q^T Q = I``, we rotate
only when ``Q`` changes (half the projections per step). The estimated eigenvalues used for
sorting are ``diag(Q^T GG Q)`` computed as a column-wise dot product (no extra matmul). All
statistics are kept in float32 (or the gradient's dtype if wider) even for bf16/fp16 gradients,
and ``load_state_dict`` restores them without casting to the parameter dtype, so a resume is
bit-exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from itertools import chain
from typing import Annotated, Any

import torch
from torch import nn

from .ranges import PositiveFloat, PositiveInt, Range

OPTIMIZERS = ("adamw", "soap")
Beta = Annotated[float, Range(ge=0, lt=1)]  # a moving average's decay


@dataclass
class SOAPConfig:
    """SOAP hyperparameters; defaults are the official ``soap.py`` defaults (Vyas et al. 2025)."""

    betas: tuple[Beta, Beta] = (0.95, 0.95)  # soap.py: Adam's (b1, b2)
    # soap.py: < 0 means "use betas[1]" for the GG moving average
    shampoo_beta: Annotated[float, Range(lt=1)] = -1
    eps: PositiveFloat = 1e-8  # soap.py: added to sqrt(v)
    precondition_frequency: PositiveInt = 10  # soap.py: eigenbasis refresh period (steps)
    max_precond_dim: PositiveInt = 10000  # soap.py: larger dimensions are left unpreconditioned
    merge_dims: bool = False  # soap.py: merge small dims before preconditioning
    precondition_1d: bool = False  # soap.py: 1-D params get plain Adam
    normalize_grads: bool = False  # soap.py: per-layer RMS normalisation of the update
    correct_bias: bool = True  # soap.py: Adam bias correction
    data_format: str = "channels_first"  # soap.py: layout of 4-D conv weights (NCHW)


@dataclass
class AdamWConfig:
    """AdamW hyperparameters; DINO builds ``torch.optim.AdamW(params_groups)`` with torch defaults."""

    betas: tuple[Beta, Beta] = (0.9, 0.999)  # torch.optim.AdamW default, used by DINO
    eps: PositiveFloat = 1e-8  # torch.optim.AdamW default, used by DINO
    fused: bool | None = None  # None -> fused kernel when every parameter is on CUDA


def get_param_groups(model: nn.Module, no_weight_decay: Iterable[str] = ()) -> list[dict]:
    """DINO's two groups: regularised params, then biases and 1-D params with ``weight_decay=0``.

    Same rule as the official ``utils.get_params_groups``: a parameter is not regularised iff its
    name ends with ``.bias`` or it is 1-D (norm weights). ``cls_token`` and ``pos_embed`` are 3-D,
    so, as in official DINO, they *are* weight-decayed. Frozen parameters are skipped.

    ``no_weight_decay``: names whose last component also joins the second group, e.g.
    ``("pos_embed", "cls_token")`` as timm's ``VisionTransformer.no_weight_decay()`` and the
    supervised recipe of Xu et al. (``optim_factory.get_parameter_groups``: 1-D, ``.bias`` or in
    the model's skip list).
    """
    skip = set(no_weight_decay)
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim == 1 or name.rsplit(".", 1)[-1] in skip:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def _all_cuda(param_groups: list[dict]) -> bool:
    params = [p for g in param_groups for p in g["params"]]
    return bool(params) and all(p.is_cuda for p in params)


def build_optimizer(
    name: str,
    param_groups: list[dict],
    lr: float = 0.0,
    weight_decay: float = 0.0,
    adamw: AdamWConfig | None = None,
    soap: SOAPConfig | None = None,
) -> torch.optim.Optimizer:
    """Build ``name`` in ``OPTIMIZERS`` over ``param_groups``.

    ``lr`` / ``weight_decay`` are only the groups' initial values: as in DINO, the schedules set
    them every iteration. A group's explicit ``weight_decay`` (0 for biases/norms) is kept.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    if key == "adamw":
        cfg = adamw or AdamWConfig()
        fused = cfg.fused
        if fused is None:
            fused = _all_cuda(param_groups)
        kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay, "betas": cfg.betas}
        kwargs["eps"] = cfg.eps
        if fused:
            kwargs["fused"] = True
        return torch.optim.AdamW(param_groups, **kwargs)
    cfg = soap or SOAPConfig()
    return SOAP(param_groups, lr=lr, weight_decay=weight_decay, **asdict(cfg))


# --------------------------------------------------------------------------------------------
# SOAP: pure tensor helpers
# --------------------------------------------------------------------------------------------


def merged_shape(shape: Iterable[int], max_precond_dim: int) -> list[int]:
    """Official ``merge_dims``: fuse consecutive dims while their product stays <= max_precond_dim."""
    new_shape: list[int] = []
    curr = 1
    for sh in shape:
        if curr * sh > max_precond_dim:
            if curr > 1:
                new_shape.append(curr)
                curr = sh
            else:
                new_shape.append(sh)
                curr = 1
        else:
            curr *= sh
    if curr > 1 or not new_shape:
        new_shape.append(curr)
    return new_shape


def project(t: torch.Tensor, qs: list[torch.Tensor | None], back: bool = False) -> torch.Tensor:
    """Mode-k products with ``Q_k^T`` (into the eigenbasis) or ``Q_k`` (``back=True``).

    Each ``tensordot`` contracts the leading dim and appends the result as the last dim, so after a
    pass over all dims the order is restored; ``None`` (unpreconditioned dim) just rotates.
    """
    if all(q is None for q in qs):
        return t
    for q in qs:
        if q is None:
            t = t.permute(*range(1, t.dim()), 0)
        else:
            t = torch.tensordot(t, q, dims=([0], [1 if back else 0]))
    return t


def orthogonal_eigh(m: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of symmetric ``m``, largest eigenvalue first (official ``get_orthogonal_matrix``)."""
    eye = torch.eye(m.shape[0], device=m.device, dtype=m.dtype)
    try:
        _, q = torch.linalg.eigh(m + 1e-30 * eye)
    except RuntimeError:  # eigh failed to converge in float32: retry in float64, as official
        _, q = torch.linalg.eigh(m.double() + 1e-30 * eye.double())
        q = q.to(m.dtype)
    return torch.flip(q, [1])


class SOAP(torch.optim.Optimizer):
    """SOAP (Vyas et al. 2025): Adam in the eigenbasis of Shampoo's preconditioner.

    Arguments and defaults are those of the official ``soap.py``; see the module docstring for
    the exact update. ``lr`` and ``weight_decay`` are read from each group at every step.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
    ):
        if lr < 0:
            raise ValueError(f"SOAP: lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"SOAP: betas must be two values in [0, 1), got {betas}")
        if shampoo_beta >= 1:
            raise ValueError(
                f"SOAP: shampoo_beta must be < 1 (or < 0 for betas[1]), got {shampoo_beta}"
            )
        if precondition_frequency < 1:
            raise ValueError(
                f"SOAP: precondition_frequency must be >= 1, got {precondition_frequency}"
            )
        if max_precond_dim < 1:
            raise ValueError(f"SOAP: max_precond_dim must be >= 1, got {max_precond_dim}")
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(
                f"SOAP: data_format must be 'channels_first' or 'channels_last', got {data_format!r}"
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "shampoo_beta": shampoo_beta,
            "eps": eps,
            "weight_decay": weight_decay,
            "precondition_frequency": precondition_frequency,
            "max_precond_dim": max_precond_dim,
            "merge_dims": merge_dims,
            "precondition_1d": precondition_1d,
            "normalize_grads": normalize_grads,
            "correct_bias": correct_bias,
        }
        super().__init__(params, defaults)
        self._data_format = data_format

    # -- shapes --------------------------------------------------------------------------------

    def _to_precond(self, t: torch.Tensor, group: dict) -> torch.Tensor:
        """The view that is preconditioned: merged (and NCHW-permuted) as the official code."""
        if group["merge_dims"] and t.dim() > 1:
            if self._data_format == "channels_last" and t.dim() == 4:
                t = t.permute(0, 3, 1, 2)
            t = t.reshape(merged_shape(t.shape, group["max_precond_dim"]))
        return t

    def _from_precond(self, t: torch.Tensor, like: torch.Tensor, group: dict) -> torch.Tensor:
        if group["merge_dims"] and like.dim() > 1:
            if self._data_format == "channels_last" and like.dim() == 4:
                n, h, w, c = like.shape
                return t.reshape(n, c, h, w).permute(0, 2, 3, 1)
            return t.reshape(like.shape)
        return t

    def _project(self, t: torch.Tensor, state: dict, group: dict, back: bool) -> torch.Tensor:
        if all(q is None for q in state["Q"]):
            return t
        out = project(self._to_precond(t, group), state["Q"], back=back)
        return self._from_precond(out, t, group)

    # -- preconditioner ------------------------------------------------------------------------

    @staticmethod
    def _shampoo_beta(group: dict) -> float:
        return group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]

    def _init_state(self, grad: torch.Tensor, state: dict, group: dict) -> None:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
        gg: list[torch.Tensor | None] = []
        if grad.dim() == 1:
            n = grad.shape[0]
            use = group["precondition_1d"] and n <= group["max_precond_dim"]
            gg.append(grad.new_zeros(n, n) if use else None)
        else:
            for sh in self._to_precond(grad, group).shape:
                gg.append(grad.new_zeros(sh, sh) if sh <= group["max_precond_dim"] else None)
        state["GG"] = gg
        self._accumulate_gg(grad, state, group)
        state["Q"] = [None if m is None else orthogonal_eigh(m) for m in gg]

    def _accumulate_gg(self, grad: torch.Tensor, state: dict, group: dict) -> None:
        """GG_k <- beta GG_k + (1 - beta) G_(k) G_(k)^T (contract all dims but k)."""
        weight = 1.0 - self._shampoo_beta(group)
        g = self._to_precond(grad, group)
        for k, m in enumerate(state["GG"]):
            if m is None:
                continue
            if g.dim() == 1:
                outer = torch.outer(g, g)
            else:
                others = [*chain(range(k), range(k + 1, g.dim()))]
                outer = torch.tensordot(g, g, dims=(others, others))
            m.lerp_(outer, weight)

    def _refresh_basis(self, state: dict, group: dict) -> None:
        """One power iteration + QR per dim; permute v along the re-sorted eigenvectors."""
        old_q = list(state["Q"])
        exp_avg = self._project(state["exp_avg"], state, group, back=True)
        v = self._to_precond(state["exp_avg_sq"], group)
        new_q: list[torch.Tensor | None] = []
        for k, (m, q) in enumerate(zip(state["GG"], old_q)):
            if m is None:
                new_q.append(None)
                continue
            mq = m @ q
            est_eig = (q * mq).sum(0)  # diag(Q^T GG Q)
            order = torch.argsort(est_eig, descending=True)
            v = v.index_select(k, order)
            new_q.append(torch.linalg.qr(mq[:, order])[0])
        state["exp_avg_sq"] = self._from_precond(v, state["exp_avg_sq"], group).contiguous()
        state["Q"] = new_q
        state["exp_avg"] = self._project(exp_avg, state, group, back=False).contiguous()

    # -- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SOAP does not support sparse gradients")
                grad = p.grad
                if grad.dtype in (torch.float16, torch.bfloat16):
                    grad = grad.float()  # statistics in float32 whatever the grad precision
                state = self.state[p]
                if "Q" not in state:
                    # Official: the first call only builds GG and Q, and skips the update.
                    self._init_state(grad, state, group)
                    continue

                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                g_proj = self._project(grad, state, group, back=False)
                exp_avg.mul_(beta1).add_(g_proj, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).add_(g_proj.square(), alpha=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])

                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                update = self._project(exp_avg / denom, state, group, back=True)
                if group["normalize_grads"]:
                    update = update / (1e-30 + torch.mean(update**2) ** 0.5)
                p.add_(update.to(p.dtype), alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])

                # After the update, so the current gradient never enters its own projection.
                self._accumulate_gg(grad, state, group)
                if t % group["precondition_frequency"] == 0 and any(
                    q is not None for q in state["Q"]
                ):
                    self._refresh_basis(state, group)
        return loss

    # -- checkpointing -------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load groups as torch does, but restore the state without casting it to the param dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to each parameter's dtype,
        which would round the float32 statistics of bf16 parameters; resume must be exact.
        """
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                self.state[p] = _clone_to(saved[i], p.device)


def _clone_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: _clone_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_to(v, device) for v in value)
    return value
