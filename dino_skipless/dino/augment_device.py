"""DINO multi-crop augmentation on the training device (``data.augment_on: device``).

The official pipeline (``augment.MultiCropAugmentation``) costs tens of ms of CPU per image, so a
GPU needs ~150-250 loader cores. Here the work is split in two:

* **Loader worker (CPU, cheap)**: ``SeededDecode`` decodes the image to uint8 and *samples every
  random parameter* of every view, from torch's and Python's RNGs seeded by
  ``sample_seeds(seed, epoch, index)`` exactly as ``SeededMultiCrop`` does, drawing them through
  torchvision's own ``RandomResizedCrop.get_params`` / ``ColorJitter.get_params`` in the official
  call order. So a sample's parameters are *the same numbers* the CPU path draws for it: crops
  stay a pure function of (seed, epoch, index), ``--resume`` is exact and N processes equal one.
  The device never draws random numbers (no RNG state to checkpoint, no dependence on batch
  composition or on the device's RNG implementation).
* **Training device (batched)**: ``device_multicrop`` pads the uint8 images into one canvas and
  applies the parameters: RandomResizedCrop + flip as one separable resampling per view (a
  dense ``out x in`` weight matrix per sample and axis, built with PIL's antialiased bicubic
  filter and its window rounding, so downscaling is antialiased exactly as PIL's
  ``Image.resize`` does; the flip is the reversed matrix), then ColorJitter in the sampled
  per-sample order with torchvision's tensor formulas, grayscale, Gaussian blur with the
  sampled sigma, solarisation at 128 and normalisation. Views of one size are processed as one
  batch.

Why own torch code rather than a library: Kornia's ``augmentation`` module samples its own
parameters on the device (so crops would no longer equal the CPU path's or be reproducible from
(seed, epoch, index) without replaying its generator), its RandomResizedCrop does not antialias
when downscaling, and its ``ColorJitter`` uses a fixed op order by default; DALI is GPU-only, so
the path could not run (nor be tested) on CPU. The ops here are ~200 lines of plain torch that run
on any device, and each is tested against torchvision's functional op (``tests/
test_dino_augment_device.py``).

Documented deviations from the official PIL pipeline (measured in the tests):

* arithmetic is float32 from the uint8 decode to the end; PIL rounds to uint8 after every op
  (resize, each jitter op, grayscale, blur). Typical difference < 1/255, see the tests' bounds;
* Gaussian blur is a true Gaussian (kernel truncated at 3 sigma, edges replicated); PIL's
  ``GaussianBlur(radius)`` is three box blurs with the same variance;
* contrast uses the exact grayscale mean (PIL rounds it to an integer); hue is shifted in float
  HSV (PIL quantises hue to 256 levels);
* optional ``data.decode_draft: N`` decodes JPEGs at the largest libjpeg scale (1/2, 1/4, 1/8)
  that keeps both sides >= N. Crop boxes are sampled on the full-size image (so parameters are
  unchanged) and rescaled onto the smaller decode; crops are then resampled from fewer pixels.
  Off by default; its effect is measured by ``scripts/bench_loader.py --draft``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from ..data.files import read_image, to_rgb
from .augment import AugConfig
from .sampling import sample_seeds

# Columns of a view's parameter row (one row per view, per sample).
TOP, LEFT, HEIGHT, WIDTH, FLIP, JITTER = 0, 1, 2, 3, 4, 5
ORDER = slice(6, 10)  # ColorJitter's fn_idx: a permutation of 0..3
FACTORS = slice(10, 14)  # brightness, contrast, saturation, hue (NaN: op disabled)
GRAY, BLUR, SIGMA, SOLARIZE = 14, 15, 16, 17
N_PARAMS = 18

SOLARIZE_THRESHOLD = 128 / 255  # ImageOps.solarize default threshold=128
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale


def views(cfg: AugConfig) -> list[tuple[int, tuple[float, float], float, float | None]]:
    """(size, scale, blur_p, solarize_p) of each view, in the official order (solarize_p None:
    the view has no Solarization transform, so it draws no random number for it)."""
    g, loc = (cfg.global_size, cfg.global_scale), (cfg.local_size, cfg.local_scale)
    return [
        (*g, cfg.blur_p_global1, None),
        (*g, cfg.blur_p_global2, cfg.solarize_p_global2),
        *[(*loc, cfg.blur_p_local, None)] * int(cfg.n_local),
    ]


class _Draws:
    """torchvision's draws (``RandomResizedCrop.get_params``, ``torch.rand(1)``,
    ``ColorJitter.get_params``) consuming torch's global generator identically, on reused
    one-element buffers: the same numbers at a fraction of the per-call overhead (the
    parameter sampling runs ~10x per image in every loader worker). Equality with the official
    draws is tested (``test_parameters_are_the_official_pipelines_draws``)."""

    def __init__(self) -> None:
        self.f = torch.empty(1)
        self.i = torch.empty(1, dtype=torch.int64)

    def uniform(self, lo: float, hi: float) -> float:
        return self.f.uniform_(lo, hi).item()  # == torch.empty(1).uniform_(lo, hi)

    def rand(self) -> float:
        return self.f.uniform_(0.0, 1.0).item()  # torch.rand(1) is uniform_(0, 1)

    def randint(self, high: int) -> int:
        return int(self.i.random_(0, high).item())  # == torch.randint(0, high, (1,))

    def crop(self, height: int, width: int, scale, log_ratio, ratio) -> tuple[int, ...]:
        """RandomResizedCrop.get_params, line for line."""
        area = height * width
        for _ in range(10):
            target_area = area * self.uniform(scale[0], scale[1])
            aspect_ratio = math.exp(self.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = self.randint(height - h + 1)
                j = self.randint(width - w + 1)
                return i, j, h, w
        in_ratio = float(width) / float(height)  # fallback: central crop
        if in_ratio < min(ratio):
            w = width
            h = int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            h = height
            w = int(round(h * max(ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def sample_params(cfg: AugConfig, height: int, width: int) -> torch.Tensor:
    """``(n_views, N_PARAMS)`` float64 rows drawn from the *global* torch / Python RNGs in the
    exact order of ``MultiCropAugmentation`` (crop, flip, jitter p + params, grayscale, blur
    p + sigma, solarise p), so equal RNG states give the CPU path's parameters."""
    b, c, s, h = cfg.jitter
    ranges = transforms.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)
    ranges = [ranges.brightness, ranges.contrast, ranges.saturation, ranges.hue]
    # torchvision: torch.log(torch.tensor(ratio)), float32, then used as uniform_ bounds
    log_ratio = torch.log(torch.tensor(list(cfg.ratio))).tolist()
    draw = _Draws()
    rows = []
    for _, scale, blur_p, solar_p in views(cfg):
        row = [math.nan] * N_PARAMS
        row[TOP : WIDTH + 1] = draw.crop(height, width, scale, log_ratio, cfg.ratio)
        row[FLIP] = float(draw.rand() < cfg.flip_p)  # RandomHorizontalFlip
        row[JITTER] = float(not cfg.jitter_p < draw.rand())  # RandomApply
        if row[JITTER]:  # ColorJitter.get_params: a random order, then each enabled factor
            row[ORDER] = [float(k) for k in torch.randperm(4).tolist()]
            row[FACTORS] = [math.nan if r is None else draw.uniform(r[0], r[1]) for r in ranges]
        row[GRAY] = float(draw.rand() < cfg.grayscale_p)  # RandomGrayscale
        row[BLUR] = float(random.random() <= blur_p)  # augment.GaussianBlur
        if row[BLUR]:
            row[SIGMA] = random.uniform(*cfg.blur_sigma)
        row[SOLARIZE] = float(solar_p is not None and random.random() < solar_p)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def load_rgb_draft(path: Path, min_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image decoded at a JPEG scale keeping both sides >= min_side, full (w, h)); every
    failure a DatasetError naming the file, as ``data.files.load_rgb``."""

    def use(im):
        full = im.size
        if im.format == "JPEG":
            im.draft("RGB", (min_side, min_side))
        im.load()
        return to_rgb(im, path), full

    return read_image(path, use)


class SeededDecode(Dataset):
    """``ds[(epoch, index)] -> (uint8 HWC image, params (n_views, N_PARAMS), (sy, sx))``.

    The loader side of the device path: decode, sample the parameters from the (seed, epoch,
    index) RNGs as ``trainer.SeededMultiCrop`` (the caller's RNG streams are restored), and
    return ``(sy, sx)``, the decoded / full size ratio (1 unless ``draft`` shrank the decode).
    ``with_target=True`` appends the base sample's second element (a label or a mask) as it is,
    for the supervised ceilings (``dino_skipless.supervised``).
    """

    def __init__(
        self, base: Dataset, cfg: AugConfig, seed: int, draft: int = 0, with_target: bool = False
    ):
        self.base, self.cfg, self.seed, self.draft = base, cfg, seed, int(draft)
        self.with_target = with_target
        if self.draft and not hasattr(base, "image_path"):
            raise ValueError(
                f"data.decode_draft needs a dataset with image paths, got {type(base).__name__}"
            )
        if self.draft and with_target:
            raise ValueError("data.decode_draft decodes the image only; it has no target path")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if self.draft:
            img, (full_w, full_h) = load_rgb_draft(self.base.image_path(index), self.draft)
        else:
            sample = self.base[index]
            img = sample[0]
            full_w, full_h = img.size
        if img.mode != "RGB":
            img = img.convert("RGB")
        torch_seed, py_seed = sample_seeds(self.seed, epoch, index)
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        try:
            torch.default_generator.manual_seed(torch_seed)
            random.seed(py_seed)
            params = sample_params(self.cfg, full_h, full_w)
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # HWC: one copy, no permute
        scale = torch.tensor([img.height / full_h, img.width / full_w], dtype=torch.float64)
        if self.with_target:
            return pixels, params, scale, sample[1]
        return pixels, params, scale


def collate_decoded(batch: list) -> dict[str, torch.Tensor]:
    """Pad the uint8 HWC images into one ``(B, H_max, W_max, 3)`` canvas (top-left aligned;
    the padding gets zero resampling weight)."""
    pixels, params, scales = zip(*batch)
    h = max(p.shape[0] for p in pixels)
    w = max(p.shape[1] for p in pixels)
    canvas = torch.zeros(len(pixels), h, w, 3, dtype=torch.uint8)
    for k, p in enumerate(pixels):
        canvas[k, : p.shape[0], : p.shape[1]] = p
    return {"canvas": canvas, "params": torch.stack(params), "scale": torch.stack(scales)}


# ---------------------------------------------------------------------------------------------
# Device ops: batched, float in [0, 1], (N, 3, H, W); per-sample factors are (N,) tensors
# ---------------------------------------------------------------------------------------------


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5), Resample.c ``bicubic_filter``."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_weights(
    start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int
) -> torch.Tensor:
    """``(N, out_size, in_size)``: row x averages the input interval ``[start, start + length)``
    onto output pixel x as PIL's antialiased bicubic ``resize`` of that crop (Resample.c
    ``precompute_coeffs``: support 2 x max(scale, 1), window rounded and clipped to the crop)."""
    start, length = start.double(), length.double()
    scale = length / out_size
    fscale = scale.clamp(min=1.0)
    support = 2.0 * fscale
    x = torch.arange(out_size, dtype=torch.float64, device=start.device) + 0.5
    centre = start[:, None] + x * scale[:, None]
    lo = torch.floor(centre - support[:, None] + 0.5).maximum(start.round()[:, None])
    hi = torch.floor(centre + support[:, None] + 0.5).minimum((start + length).round()[:, None])
    u = torch.arange(in_size, dtype=torch.float64, device=start.device)
    w = _bicubic((u - centre[..., None] + 0.5) / fscale[:, None, None])
    w = w * ((u >= lo[..., None]) & (u < hi[..., None]))
    return (w / w.sum(-1, keepdim=True)).float()


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    wr, wg, wb = GRAY_WEIGHTS
    return (wr * r + wg * g + wb * b).unsqueeze(-3)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (f * x + (1.0 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * rgb_to_grayscale(x)).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's float HSV round trip with ``h = (h + f) mod 1``."""
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(-3), x.amin(-3)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    # HSV -> RGB in closed form: channel n is v - v s clamp(min(k, 4 - k), 0, 1), k = n + 6h mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6.0 * h, 6.0)
        out.append(maxc - maxc * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, -3).clamp(0.0, 1.0)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian with per-sample ``sigma``, truncated at 3 x ``max_sigma`` (replicate
    edges, as PIL's box blurs)."""
    n, c, hh, ww = x.shape
    half = max(1, math.ceil(3.0 * max_sigma))
    t = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma.to(x.dtype).view(-1, 1)) ** 2)
    k = (k / k.sum(-1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, ks)
    y = F.pad(x.reshape(1, n * c, hh, ww), (half, half, half, half), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, hh, ww)


def solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)


def _apply_subset(x: torch.Tensor, rows: torch.Tensor, fn, *args) -> torch.Tensor:
    """``x[rows] = fn(x[rows], *args[rows])`` for the rows (CPU bool mask) that need it."""
    idx = rows.nonzero().squeeze(1)  # on the CPU parameters: no device sync
    if idx.numel() == 0:
        return x
    dev_idx = idx.to(x.device, non_blocking=True)
    sub = [a[idx].to(x.device, torch.float32, non_blocking=True) for a in args]
    return x.index_copy(0, dev_idx, fn(x.index_select(0, dev_idx), *sub))


def photometric(x: torch.Tensor, p: torch.Tensor, cfg: AugConfig) -> torch.Tensor:
    """Jitter (per-sample order) -> grayscale -> blur -> solarise, as the official Compose;
    ``p`` is the ``(N, N_PARAMS)`` CPU parameters of the N crops in ``x``."""
    on = p[:, JITTER] > 0.5
    order, factors = p[:, ORDER], p[:, FACTORS]
    for step in range(4):
        for op, fn in enumerate(JITTER_OPS):
            rows = on & (order[:, step] == op) & ~factors[:, op].isnan()
            x = _apply_subset(x, rows, fn, factors[:, op])
    x = _apply_subset(x, p[:, GRAY] > 0.5, lambda t: rgb_to_grayscale(t).expand_as(t))
    blur = lambda t, s: gaussian_blur(t, s, cfg.blur_sigma[1])  # noqa: E731
    x = _apply_subset(x, p[:, BLUR] > 0.5, blur, p[:, SIGMA])
    return _apply_subset(x, p[:, SOLARIZE] > 0.5, solarize)


def resized_crops(canvas: torch.Tensor, p: torch.Tensor, scale: torch.Tensor, size: int):
    """``(V, B, 3, size, size)`` crops + flips of the ``(B, 3, H, W)`` float canvas, for the
    ``(V, B, N_PARAMS)`` CPU parameters and the ``(B, 2)`` decode/full size ratios."""
    v, b = p.shape[:2]
    _, _, hh, ww = canvas.shape
    flat = p.reshape(v * b, N_PARAMS)
    sy, sx = scale[:, 0].repeat(v), scale[:, 1].repeat(v)
    # only the boxes travel; the (N, size, H) matrices are built on the device, not the CPU
    boxes = torch.stack(
        [
            flat[:, TOP] * sy,
            flat[:, HEIGHT] * sy,
            flat[:, LEFT] * sx,
            flat[:, WIDTH] * sx,
            flat[:, FLIP],
        ]
    ).to(canvas.device, non_blocking=True)
    wy = resample_weights(boxes[0], boxes[1], size, hh).view(v, b, size, hh)
    wx = resample_weights(boxes[2], boxes[3], size, ww)
    flip = (boxes[4] > 0.5).view(-1, 1, 1)
    wx = torch.where(flip, wx.flip(1), wx).view(v, b, size, ww)  # column x <- size - 1 - x
    rows = torch.einsum("vboh,bchw->vbcow", wy, canvas)
    return torch.einsum("vbcow,vbpw->vbcop", rows, wx).clamp_(0.0, 1.0)


def device_multicrop(
    batch: dict[str, torch.Tensor], cfg: AugConfig, device: torch.device | str
) -> list[torch.Tensor]:
    """``[global1, global2, local_1..local_n]``, each ``(B, 3, s, s)`` float32 normalised on
    ``device``, from a ``collate_decoded`` batch (what ``MultiCropAugmentation`` + the default
    collate give on the CPU path)."""
    device = torch.device(device)
    canvas = batch["canvas"].to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    params, scale = batch["params"], batch["scale"]
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
    b = params.shape[0]
    out: list[torch.Tensor] = []
    groups = [(cfg.global_size, 0, 2), (cfg.local_size, 2, 2 + int(cfg.n_local))]
    for size, first, last in groups:
        if last <= first:
            continue
        p = params[:, first:last].transpose(0, 1).contiguous()  # (V, B, N_PARAMS)
        v = last - first
        x = resized_crops(canvas, p, scale, size).view(v * b, 3, size, size)
        x = photometric(x, p.view(v * b, N_PARAMS), cfg)
        x = ((x - mean) / std).view(v, b, 3, size, size)
        out.extend(x.unbind(0))
    return out
