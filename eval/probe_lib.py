"""Dense linear probing (paper Sec. 6.2.1): a 1x1 linear classifier on frozen patch features.

Protocol (``LinProbeConfig`` holds every default, in one place):

* features: final-LayerNorm'd block outputs (DINO's ``get_intermediate_layers``), one block
  (default the last) or several concatenated (multiscale, default the last four), from images
  resized to ``resolution x resolution``; each channel standardised with the training set's
  mean/std (a fixed BatchNorm, as DINOv2's linear segmentation head uses BN before the 1x1 conv;
  it is an affine reparametrisation of the classifier, so it changes conditioning, not the model
  class);
* classifier: 1x1 conv (weights ``N(0, 0.01)``, bias 0, as DINO's ``LinearClassifier``),
  logits upsampled bilinearly to label resolution, cross-entropy ignoring 255;
* optimiser: SGD momentum 0.9, weight decay 0, cosine schedule to 0 over all steps (DINO's linear
  evaluation recipe), 30 epochs, a sweep of learning rates; the best is reported, all are kept.

Every learning rate of the sweep trains together: one weight tensor ``(L, C, D)`` with a
per-lr step size, so each epoch reads each cached feature once for all L probes. The lrs share
the initial weights and the batch order (same seed), so each probe is exactly the one that a
run with that single lr would train (up to float summation order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dino_skipless.cli import default_num_workers
from dino_skipless.errors import UserError

from .metrics import (
    batched_confusion,
    bootstrap_miou,
    mean_iou,
    per_class_iou,
    per_image_confusion,
    pixel_accuracy,
    tp_fp_fn,
)

IGNORE_INDEX = 255


class ProbeDivergedError(UserError):
    """Every learning rate of a probe diverged: there is no result to report."""


@dataclass
class LinProbeConfig:
    """Defaults of the dense linear probe (paper Sec. 6.2.1 where it says, DINO otherwise)."""

    # Input side in pixels; 448 for /16 backbones gives a 28x28 patch grid (the resolution used
    # by dense DINO probes; the paper does not state one). Must be a multiple of the patch size.
    resolution: int = 448
    epochs: int = 30  # paper: "train for 30 epochs"
    # Paper: "we sweep over learning rates" (values not given). A log grid with half-decade
    # steps covering SGD's useful range on standardised features.
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    batch_size: int = 16  # images per probe step
    momentum: float = 0.9  # DINO eval_linear: SGD(momentum=0.9, weight_decay=0), cosine
    weight_decay: float = 0.0
    init_std: float = 0.01  # DINO LinearClassifier: weight ~ N(0, 0.01), bias 0
    standardize: bool = True  # per-channel train mean/std on cached features (see module doc)
    layers: tuple[int, ...] | None = None  # single-block probe; None = last block
    ms_layers: tuple[int, ...] | None = None  # multiscale probe; None = last four blocks
    # Paper: "for ADE20k and COCO-Stuff, we randomly sample 3,000 training images".
    train_subset: int | None = 3000
    subset_seed: int = 0
    voc_train_split: str = "train"  # VOC2012 'train' (1,464); 'trainaug' (10,582) needs SBD
    # VOC: the paper probes on the whole split (None). A number takes a seeded subset of it: the
    # synthetic replication uses it to score on more validation scenes than it trains on.
    voc_train_subset: int | None = None
    seed: int = 0  # probe init and batch order (and the bootstrap's resampling)
    # Bootstrap resamples of the validation images for the mIoU error bar (0 = none). Not part
    # of the paper's protocol; it reports how much the number would move with other images.
    bootstrap: int = 1000
    # Mask pixels outside the dataset's label set (values that are no class, RGB colours not in
    # the palette) read as ignore. Above this fraction of a split's pixels the probe is refused
    # (a mistake in the masks, not the dataset's annotation); below, one warning names the
    # files. Not in the paper: real VOC/ADE20K/COCO-Stuff masks hold none.
    max_unknown_label_fraction: float = 0.001
    extract_batch_size: int = 16
    num_workers: int = field(default_factory=default_num_workers)  # 4, at most the CPU count
    # Cap on the upsampled logits of one chunk (elements); a step is split over lrs, then over
    # images, into chunks that fit (the features of a batch are still read once for all lrs).
    # None = by device: 2**28 on GPUs (few large kernels), 2**20 on CPUs, where the ~8 passes
    # of a training step over its upsampled logits run fastest from cache (4 MB chunks: 1.7x
    # faster than 16 MB ones; above glibc's 32 MB mmap ceiling every step also page-faults;
    # README, "Speed of the evaluation stages on CPU").
    max_logit_elems: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def default_layers(depth: int) -> tuple[list[int], list[int]]:
    """(single, multiscale) defaults: the last block, and the last four."""
    return [depth - 1], list(range(max(0, depth - 4), depth))


# ------------------------------------------------------------------------------- normalisation


def channel_stats(
    feat: torch.Tensor, chunk: int = 64, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over (N, h, w) of a cached ``(N, D, h, w)`` grid (float64 sums)."""
    n, d = feat.shape[:2]
    s = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, dtype=torch.float64)
    count = 0
    for i in range(0, n, chunk):
        x = feat[i : i + chunk].double()
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / count
    var = (s2 / count - mean * mean).clamp_min(0)
    return mean.float(), (var.sqrt() + eps).float()


@dataclass
class Normalizer:
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mean.to(x.device).view(1, -1, 1, 1)
        s = self.std.to(x.device).view(1, -1, 1, 1)
        return (x - m) / s


# ------------------------------------------------------------------------------------ training


@dataclass
class ProbeWeights:
    """L probes: ``weight (L, C, D)``, ``bias (L, C)`` for the learning rates ``lrs``."""

    weight: torch.Tensor
    bias: torch.Tensor
    lrs: list[float]
    losses: list[list[float]] = field(default_factory=list)  # per epoch, per lr

    @property
    def diverged(self) -> list[bool]:
        """Per lr: non-finite weights or training loss, or a last epoch's mean training loss
        above ``DIVERGED_LOSS`` x ln(C) (ln C: the loss of the untrained probe, which starts
        near the uniform prediction): SGD that ends that far above it has blown up even where
        the numbers stayed finite."""
        ok = torch.isfinite(self.weight).flatten(1).all(1) & torch.isfinite(self.bias).all(1)
        ok = ok.cpu()
        if self.losses:
            losses = torch.tensor(self.losses, dtype=torch.float64)
            ok &= torch.isfinite(losses).all(0)
            ok &= losses[-1] <= DIVERGED_LOSS * math.log(max(self.weight.shape[1], 2))
        return (~ok).tolist()


# A probe whose last epoch's training loss ends above this multiple of ln(C) has blown up.
# Far above mere instability: in the small-scale replication the worst unstable probes (lr 0.3
# and 1.0 on a skipless model, multiscale) ended at 2.0x and 9.5x ln(21) and still scored at
# the majority-class floor; lr 1e38 ends near 1e37.
DIVERGED_LOSS = 100.0
GPU_LOGIT_CAP = 2**28
CPU_LOGIT_CAP = 2**20


def logit_cap(value: int | None, device: torch.device | str) -> int:
    """``LinProbeConfig.max_logit_elems``, with None resolved for the device."""
    if value is not None:
        return int(value)
    return GPU_LOGIT_CAP if torch.device(device).type == "cuda" else CPU_LOGIT_CAP


def _chunks(n_l: int, per_lr_elems: int, cap: int) -> list[slice]:
    step = max(1, min(n_l, cap // max(per_lr_elems, 1)))
    return [slice(i, min(i + step, n_l)) for i in range(0, n_l, step)]


def _step_chunks(bsz: int, n_l: int, per_elems: int, cap: int) -> list[tuple[slice, slice]]:
    """(images, lrs) slices covering a ``bsz x n_l`` step, each holding at most ``cap`` logits
    (``per_elems`` per image and lr) unless one image of one lr is already larger."""
    lr_step = max(1, min(n_l, cap // max(bsz * per_elems, 1)))
    im_step = bsz if lr_step > 1 else max(1, min(bsz, cap // max(per_elems, 1)))
    return [
        (slice(i, min(i + im_step, bsz)), slice(j, min(j + lr_step, n_l)))
        for i in range(0, bsz, im_step)
        for j in range(0, n_l, lr_step)
    ]


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x (B, D, h, w)``, ``w (L, C, D)``, ``b (L, C)`` -> ``(B, L, C, h, w)``."""
    return torch.einsum("bdhw,lcd->blchw", x, w) + b[None, :, :, None, None]


def upsample_matrix(n_in: int, n_out: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(n_out, n_in)`` matrix ``A`` of 1-D linear resampling as ``F.interpolate`` does it
    (``align_corners=False``): bilinear upsampling of ``X (h, w)`` to ``(H, W)`` is
    ``A_h X A_w^T``. Built by resampling unit vectors, so it is PyTorch's formula by construction."""
    eye = torch.eye(n_in, device=device, dtype=dtype).view(n_in, 1, n_in, 1)
    up = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)
    return up.view(n_in, n_out).T.contiguous()


def probe_loss_and_grads(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    a_h: torch.Tensor,
    a_w: torch.Tensor,
    n_valid: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-lr loss and its exact gradients for L 1x1 probes, without autograd.

    ``x (B, D, h, w)`` features, ``y (B, H, W)`` labels (255 = ignore), ``weight (L, C, D)``,
    ``bias (L, C)``, ``a_h (H, h)`` / ``a_w (W, w)`` from ``upsample_matrix``. The loss of lr
    ``l`` is the cross-entropy of the bilinearly upsampled logits summed over valid pixels,
    divided by ``n_valid``. Returns ``(loss (L,), grad_weight (L, C, D), grad_bias (L, C))``.

    Why by hand: with autograd through ``F.interpolate`` and a channel-strided cross-entropy,
    their backward took ~70 % of a CPU step. Here both resamplings are plain matrix products
    and the softmax gradient is computed in place on the one large tensor (1.7x faster).
    """
    bsz, n_l, n_c = x.shape[0], weight.shape[0], weight.shape[1]
    h, w = x.shape[-2:]
    big_h, big_w = y.shape[-2:]
    n = bsz * n_l * n_c
    lg = _logits(x, weight, bias).reshape(n * h, w)
    # rows then columns; the result is kept as (n, W, H): one small transpose instead of a big one
    t = (lg @ a_w.T).view(n, h, big_w).transpose(1, 2).reshape(n * big_w, h)
    up = (t @ a_h.T).view(bsz * n_l, n_c, big_w * big_h)
    yt = y.transpose(-1, -2).reshape(bsz, 1, big_w * big_h)
    valid = yt != IGNORE_INDEX
    idx = torch.where(valid, yt, 0).long().expand(bsz, n_l, -1).reshape(bsz * n_l, 1, -1)
    lse = torch.logsumexp(up, 1, keepdim=True)
    picked = up.gather(1, idx)
    scale = valid.to(up.dtype) / n_valid  # (B, 1, P)
    nll = (lse - picked).view(bsz, n_l, -1) * scale
    g = up.sub_(lse).exp_()  # softmax, in place
    g.scatter_(1, idx, (picked - lse).exp_() - 1)
    g = g.view(bsz, n_l, n_c, -1).mul_(scale[:, :, None])
    g = (g.view(n * big_w, big_h) @ a_h).view(n, big_w, h).transpose(1, 2).reshape(n * h, big_w)
    g_lg = (g @ a_w).view(bsz, n_l, n_c, h, w)
    grad_w = torch.einsum("blchw,bdhw->lcd", g_lg, x)
    return nll.sum((0, 2)), grad_w, g_lg.sum((0, 3, 4))


@contextmanager
def flush_denormals(device: torch.device | str):
    """On a CPU, treat subnormal floats as zero while the probes train (then back to torch's
    default). A large-lr probe's softmax gradient is mostly numbers below 1e-38, which x86 cores
    process many times slower. The slowest probe of the replication ran 12 % faster with the
    same mIoU; of its 84 (probe, lr) scores 80 stayed the same to the last digit and 4, all at
    the largest lr, moved by 0.01-0.23 mIoU (README, "Speed of the evaluation stages on CPU")."""
    on = torch.device(device).type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


def train_probes(
    features: Callable[[torch.Tensor], torch.Tensor],
    masks: torch.Tensor,
    num_classes: int,
    dim: int,
    lrs: Sequence[float],
    cfg: LinProbeConfig,
    device: torch.device | str = "cpu",
    normalizer: Callable | None = None,
    progress: bool = True,
) -> ProbeWeights:
    """Train one linear probe per learning rate, all in the same pass over the data.

    ``features(idx) -> (B, dim, h, w)`` float (e.g. reading a FeatureCache), ``masks (N, H, W)``
    uint8 targets (255 = ignore); logits are upsampled bilinearly to ``(H, W)``. The update is
    ``torch.optim.SGD(lr, momentum, weight_decay)`` per lr (buffer = grad at the first step),
    with a per-step cosine decay of every lr to 0. On a CPU the loop runs with subnormal floats
    flushed to zero (``flush_denormals``).
    """
    device = torch.device(device)
    n = len(masks)
    lrs = [float(v) for v in lrs]
    n_l = len(lrs)
    gen = torch.Generator().manual_seed(cfg.seed)
    w0 = torch.randn(num_classes, dim, generator=gen) * cfg.init_std
    weight = w0.expand(n_l, -1, -1).clone().to(device)
    bias = torch.zeros(n_l, num_classes, device=device)
    grads = [torch.zeros_like(weight), torch.zeros_like(bias)]
    bufs = [torch.zeros_like(weight), torch.zeros_like(bias)]
    lr_vec = torch.tensor(lrs, device=device)
    cap = logit_cap(cfg.max_logit_elems, device)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, cfg.epochs * steps_per_epoch)
    out = ProbeWeights(weight, bias, lrs)
    resample: dict[tuple[int, int], torch.Tensor] = {}

    def matrix(n_in: int, n_out: int) -> torch.Tensor:
        if (n_in, n_out) not in resample:
            resample[n_in, n_out] = upsample_matrix(n_in, n_out, device)
        return resample[n_in, n_out]

    with flush_denormals(device):
        step = 0
        bar = tqdm(total=total, desc="probe", leave=False, disable=not progress, dynamic_ncols=True)
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            epoch_loss = torch.zeros(n_l, dtype=torch.float64)
            for i in range(0, n, cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                x = features(idx).to(device, non_blocking=True).float()
                if normalizer is not None:
                    x = normalizer(x)
                y = masks[idx].to(device, non_blocking=True)
                bsz, (hh, ww) = y.shape[0], y.shape[-2:]
                a_h, a_w = matrix(x.shape[-2], hh), matrix(x.shape[-1], ww)
                # normalised by the whole batch's valid pixels, so chunks add up to its loss
                n_valid = max(int((y != IGNORE_INDEX).sum()), 1)
                for g in grads:
                    g.zero_()
                for im, sl in _step_chunks(bsz, n_l, num_classes * hh * ww, cap):
                    loss, g_w, g_b = probe_loss_and_grads(
                        x[im], y[im], weight[sl], bias[sl], a_h, a_w, n_valid
                    )
                    grads[0][sl] += g_w
                    grads[1][sl] += g_b
                    epoch_loss[sl] += loss.double().cpu() * bsz
                scale = 0.5 * (1.0 + math.cos(math.pi * step / total))
                for p, g, buf in zip((weight, bias), grads, bufs):
                    if cfg.weight_decay:
                        g = g + cfg.weight_decay * p
                    if step == 0:
                        buf.copy_(g)
                    else:
                        buf.mul_(cfg.momentum).add_(g)
                    lr = (lr_vec * scale).view(-1, *([1] * (p.dim() - 1)))
                    p.sub_(lr * buf)
                step += 1
                bar.update(1)
            out.losses.append((epoch_loss / n).tolist())
        bar.close()
    return out


# ---------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_probes(
    probes: ProbeWeights,
    features: Callable[[torch.Tensor], torch.Tensor],
    masks: Sequence[torch.Tensor],
    num_classes: int,
    device: torch.device | str = "cpu",
    normalizer: Callable | None = None,
    batch_size: int = 16,
    max_logit_elems: int | None = None,
    progress: bool = True,
    per_image: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(L, C, C)`` confusion matrices over the whole set; logits upsampled bilinearly to each
    mask's own (label) resolution. Images with the same mask size are batched together.

    ``per_image=True`` also returns ``(L, N, C, 3)`` per-image TP/FP/FN counts (their sum over
    images is the confusion's), for bootstrap error bars."""
    device = torch.device(device)
    n_l = probes.weight.shape[0]
    cap = logit_cap(max_logit_elems, device)
    conf = torch.zeros(n_l, num_classes, num_classes, dtype=torch.long, device=device)
    counts = torch.zeros(n_l, len(masks), num_classes, 3, dtype=torch.long) if per_image else None
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(masks):
        by_shape.setdefault(tuple(m.shape), []).append(i)
    groups = [
        (shape, ids[j : j + batch_size])
        for shape, ids in by_shape.items()
        for j in range(0, len(ids), batch_size)
    ]
    w = probes.weight.to(device)
    b = probes.bias.to(device)
    for (hh, ww), ids in tqdm(groups, desc="eval", leave=False, disable=not progress):
        x = features(torch.tensor(ids)).to(device, non_blocking=True).float()
        if normalizer is not None:
            x = normalizer(x)
        y = torch.stack([masks[i] for i in ids]).to(device).long()
        bsz = len(ids)
        for sl in _chunks(n_l, bsz * num_classes * hh * ww, cap):
            lg = _logits(x, w[sl], b[sl])
            nl = lg.shape[1]
            up = F.interpolate(
                lg.flatten(1, 2), size=(hh, ww), mode="bilinear", align_corners=False
            ).view(bsz, nl, num_classes, hh, ww)
            pred = up.argmax(2).transpose(0, 1)  # (nl, B, H, W)
            if counts is None:
                conf[sl] += batched_confusion(pred, y, num_classes, IGNORE_INDEX)
                continue
            per_img = per_image_confusion(pred, y, num_classes, IGNORE_INDEX)  # (nl, B, C, C)
            conf[sl] += per_img.sum(1)
            counts[sl, ids] = tp_fp_fn(per_img).cpu()
    return conf.cpu() if counts is None else (conf.cpu(), counts)


def summarise(
    conf: torch.Tensor,
    lrs: Sequence[float],
    class_names: Sequence[str],
    diverged=None,
    counts: torch.Tensor | None = None,
    n_boot: int = 0,
    seed: int = 0,
) -> dict:
    """Best-lr summary (percent) from the ``(L, C, C)`` confusions of a sweep.

    With per-image ``counts`` ``(L, N, C, 3)`` and ``n_boot > 0``, adds the bootstrap standard
    error and 95 % interval of the best lr's mIoU over validation images (``miou_se``,
    ``miou_ci95``); the lr choice itself is not resampled, as in the usual reporting.

    A diverged lr (``diverged[i]``) never wins, whatever its score: its NaN probe predicts one
    class everywhere, which can beat a weak probe's mIoU. If every lr diverged there is no
    result (``ProbeDivergedError``)."""
    diverged = list(diverged) if diverged is not None else [False] * len(lrs)
    if len(lrs) and all(diverged):
        raise ProbeDivergedError(
            f"every learning rate of the probe diverged (--lrs {' '.join(map(str, lrs))}): "
            "give smaller ones"
        )
    per_lr, per_lr_pacc = {}, {}
    best, best_i = -1.0, None
    for i, lr in enumerate(lrs):
        m = mean_iou(conf[i]) * 100
        per_lr[repr(float(lr))] = m
        per_lr_pacc[repr(float(lr))] = pixel_accuracy(conf[i]) * 100
        if not diverged[i] and np.isfinite(m) and m > best:
            best, best_i = m, i
    if best_i is None:  # every finite lr scored NaN (no class present): report the first
        best_i = diverged.index(False)
    iou = per_class_iou(conf[best_i]) * 100
    out = {
        "miou": per_lr[repr(float(lrs[best_i]))],
        "best_lr": float(lrs[best_i]),
        "pacc": per_lr_pacc[repr(float(lrs[best_i]))],
        "per_lr": per_lr,
        "per_lr_pacc": per_lr_pacc,
        "per_class_iou": {
            name: (None if not np.isfinite(v) else float(v)) for name, v in zip(class_names, iou)
        },
    }
    out["diverged_lrs"] = [float(lr) for lr, d in zip(lrs, diverged) if d]
    if counts is not None and n_boot > 0:
        bs = bootstrap_miou(counts[best_i], n_boot, seed)
        out["miou_se"] = bs["se"]
        out["miou_ci95"] = [bs["lo"], bs["hi"]]
        out["n_boot"] = bs["n_boot"]
    return out


# ------------------------------------------------------------------------------------ pipeline


def probe_from_cache(
    train_cache,
    val_cache,
    layers: Sequence[int],
    num_classes: int,
    class_names: Sequence[str],
    cfg: LinProbeConfig,
    device: torch.device | str = "cpu",
    stats: dict | None = None,
    progress: bool = True,
) -> dict:
    """Train the lr sweep on ``layers`` of a training FeatureCache and score it on a validation
    cache. ``stats`` memoises per-block channel statistics across probes sharing the cache."""
    layers = [int(x) for x in layers]
    normalizer = None
    if cfg.standardize:
        stats = {} if stats is None else stats
        for layer in layers:
            if layer not in stats:
                stats[layer] = channel_stats(train_cache.feats[layer])
        normalizer = Normalizer(
            torch.cat([stats[la][0] for la in layers]), torch.cat([stats[la][1] for la in layers])
        )
    dim = sum(train_cache.dims[la] for la in layers)
    # On a GPU, keep the cached blocks resident when they fit: 30 epochs re-read them.
    train_cache = train_cache.on_device(layers, torch.device(device))
    probes = train_probes(
        lambda idx: train_cache.features(idx, layers),
        train_cache.masks,
        num_classes,
        dim,
        cfg.lrs,
        cfg,
        device,
        normalizer,
        progress,
    )
    conf = evaluate_probes(
        probes,
        lambda idx: val_cache.features(idx, layers),
        val_cache.masks,
        num_classes,
        device,
        normalizer,
        cfg.batch_size,
        cfg.max_logit_elems,
        progress,
        per_image=cfg.bootstrap > 0,
    )
    counts = None
    if cfg.bootstrap > 0:
        conf, counts = conf
    out = summarise(conf, cfg.lrs, class_names, probes.diverged, counts, cfg.bootstrap, cfg.seed)
    out["layers"] = layers
    if counts is not None:  # the best lr's, for paired comparisons (eval.compare); not JSON
        out["per_image_counts"] = counts[[float(v) for v in cfg.lrs].index(out["best_lr"])]
    out["train_loss_last_epoch"] = dict(
        zip((repr(float(v)) for v in cfg.lrs), probes.losses[-1] if probes.losses else [])
    )
    return out
