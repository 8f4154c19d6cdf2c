"""DINO multi-crop augmentation on the training device (``data.augment_on: device``/``auto``).

The official pipeline (``augment.MultiCropAugmentation``) costs tens of ms of CPU per image, so a
GPU needs ~150-250 loader cores. Here the work is split in two:

* **Loader worker (CPU, cheap)**: ``SeededDecode`` decodes the image to uint8 (or, with
  ``data.decode_on: device``, only reads the JPEG's bytes and header) and *samples every random
  parameter* of every view, from torch's and Python's RNGs seeded by
  ``sample_seeds(seed, epoch, index)`` exactly as ``SeededMultiCrop`` does, drawing them through
  torchvision's own ``RandomResizedCrop.get_params`` / ``ColorJitter.get_params`` in the official
  call order. So a sample's parameters are *the same numbers* the CPU path draws for it: crops
  stay a pure function of (seed, epoch, index), ``--resume`` is exact and N processes equal one.
  ``collate_decoded`` (also in the worker) turns the parameters into a float32 *plan*, one row per
  view: the crop box on the canvas, flips, and the photometric ops as per-view coefficients.
  The device never draws random numbers and never reads a value back to the host.
* **Training device (batched)**: ``device_multicrop`` moves the uint8 canvas and the plan (one
  pinned copy each) and applies the plan with a fixed sequence of batched ops per crop size:
  RandomResizedCrop + flip as one separable resampling per view (weights built on the device
  from the boxes, nonzero only inside each view's window, with PIL's antialiased bicubic filter
  and window rounding, so downscaling is antialiased exactly as PIL's ``Image.resize`` does),
  then ColorJitter in each view's sampled order as masked batched ops (see ``_jitter``),
  grayscale, a Gaussian blur with per-view sigma as one grouped convolution, solarisation at 128
  and normalisation. No op depends on a per-sample loop, so the op count per batch is fixed
  for a given number of canvases (``scripts/bench_loader.py`` prints it next to the model
  forward's).

Cost and memory follow each image's own pixels and the crops, not the batch's largest image: the
resampling's cost grows with the canvas the images are padded to, so ``collate_decoded`` puts an
outsized image on a canvas of its own (``canvas_groups``: at most ``MAX_CANVASES``, chosen for the
least padding; a batch of 63 500 x 375 images and one 1500 x 1125 costs 1.1x the plain batch
instead of 9x). Portrait images are stored transposed on the canvas (their crops are transposed
back), so a canvas of 4:3 and 3:4 images is as large as one of 4:3 images. ``data.
decode_max_side`` also caps the decoded image (longer side, antialiased, before cropping).

Why own torch code rather than a library: Kornia's ``augmentation`` module samples its own
parameters on the device (so crops would no longer equal the CPU path's or be reproducible from
(seed, epoch, index) without replaying its generator), its RandomResizedCrop does not antialias
when downscaling, and its ``ColorJitter`` uses a fixed op order by default; DALI is GPU-only, so
the path could not run (nor be tested) on CPU. The ops here are plain torch that runs on any
device, and each is tested against torchvision's functional op (``tests/
test_dino_augment_device.py``).

Documented deviations from the official PIL pipeline (measured in the tests):

* arithmetic is float32 from the uint8 decode to the end; PIL rounds to uint8 after every op
  (resize, each jitter op, grayscale, blur). Typical difference < 1/255, see the tests' bounds;
* Gaussian blur is a true Gaussian (kernel truncated at 3 sigma, edges replicated); PIL's
  ``GaussianBlur(radius)`` is three box blurs with the same variance;
* contrast uses the exact grayscale mean (PIL rounds it to an integer); hue is shifted in float
  HSV (PIL quantises hue to 256 levels);
* optional ``data.decode_draft: N`` decodes JPEGs at the largest libjpeg scale (1/2, 1/4, 1/8)
  that keeps both sides >= N; optional ``data.decode_max_side: N`` shrinks an image whose longer
  side exceeds N to N (a libjpeg draft no smaller than that, then PIL's antialiased bicubic).
  Crop boxes are sampled on the full-size image (so parameters are unchanged) and rescaled onto
  the smaller decode; crops are then resampled from fewer pixels. Both are off by default; their
  effect is measured by ``scripts/bench_loader.py`` (``--draft``, ``--max-side``);
* ``data.decode_on: device`` decodes JPEGs with ``torchvision.io.decode_jpeg`` on the device
  (nvJPEG on CUDA) instead of PIL in the worker; other files (PNG, CMYK JPEGs) are still decoded
  by PIL in the worker. nvJPEG's IDCT and chroma upsampling differ slightly from libjpeg's
  (``scripts/gpu_check.py`` measures it).
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

from ..data.errors import DatasetError
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


def capped_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(w, h)`` with the longer side shrunk to ``max_side`` (aspect kept); unchanged when
    ``max_side`` is 0 or the image already fits."""
    long = max(width, height)
    if not max_side or long <= max_side:
        return width, height
    s = max_side / long
    return max(1, round(width * s)), max(1, round(height * s))


def load_rgb_draft(
    path: Path, min_side: int = 0, max_side: int = 0
) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, full (w, h)): decoded at a JPEG scale keeping both sides >= ``min_side``
    (0: full scale), then shrunk to ``capped_size(.., max_side)`` if it is larger; every
    failure a DatasetError naming the file, as ``data.files.load_rgb``."""

    def use(im):
        full = im.size
        target = capped_size(*full, max_side)
        if im.format == "JPEG" and (min_side or target != full):
            want = target if target != full else (0, 0)
            im.draft("RGB", (max(want[0], min_side), max(want[1], min_side)))
        im.load()
        return to_rgb(im, path), full

    img, full = read_image(path, use)
    if capped_size(*img.size, max_side) != img.size:
        img = img.resize(capped_size(*img.size, max_side), Image.BICUBIC)
    return img, full


def read_jpeg(path: Path) -> tuple[torch.Tensor | None, tuple[int, int]]:
    """``(file bytes as a 1-D uint8 tensor, full (w, h))`` of a baseline RGB/gray JPEG that
    ``torchvision.io.decode_jpeg`` can decode on the device; ``(None, size)`` for other files
    (PNG, CMYK JPEG), which the worker decodes itself. The header is read by
    ``data.files.read_image``: a missing, undecodable or oversized file is a DatasetError."""

    def header(im):
        return im.size, im.format == "JPEG" and im.mode in ("RGB", "L")

    size, ok = read_image(path, header)
    if not ok:
        return None, size
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DatasetError(f"image unreadable: {path}: {e}") from e
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), size


class SeededDecode(Dataset):
    """``ds[(epoch, index)] -> (image, params (n_views, N_PARAMS), (sy, sx))``.

    The loader side of the device path: decode, sample the parameters from the (seed, epoch,
    index) RNGs as ``trainer.SeededMultiCrop`` (the caller's RNG streams are restored), and
    return ``(sy, sx)``, the decoded / full size ratio (1 unless ``draft`` or ``max_side``
    shrank the decode). The image is uint8 HWC pixels, or with ``encoded=True`` (``data.
    decode_on: device``) a JPEG's bytes with the size to decode to: ``{"jpeg": bytes, "hw":
    (h, w)}``. ``with_target=True`` appends the base sample's second element (a label or a mask)
    as it is, for the supervised ceilings (``dino_skipless.supervised``).
    """

    def __init__(
        self,
        base: Dataset,
        cfg: AugConfig,
        seed: int,
        draft: int = 0,
        with_target: bool = False,
        max_side: int = 0,
        encoded: bool = False,
    ):
        self.base, self.cfg, self.seed, self.draft = base, cfg, seed, int(draft)
        self.max_side, self.encoded, self.with_target = int(max_side), encoded, with_target
        needs_path = [n for n, v in (("decode_draft", draft), ("decode_on=device", encoded)) if v]
        if needs_path and not hasattr(base, "image_path"):
            raise ValueError(
                f"data.{needs_path[0]} needs a dataset with image paths, got {type(base).__name__}"
            )
        if (self.draft or self.max_side or encoded) and with_target:
            raise ValueError(
                "data.decode_draft / decode_max_side / decode_on=device change the image only; "
                "a target (label, mask) has no such path"
            )
        if encoded and self.draft:
            raise ValueError("data.decode_draft is a libjpeg option; decode_on=device has none")

    def __len__(self) -> int:
        return len(self.base)

    def _image(self, index: int):
        """(uint8 HWC pixels or an encoded JPEG, full (w, h), decoded (w, h))."""
        if self.encoded:
            data, full = read_jpeg(self.base.image_path(index))
            if data is not None:
                w, h = capped_size(*full, self.max_side)
                return {"jpeg": data, "hw": (h, w)}, full, (w, h)
        if self.draft or self.max_side and hasattr(self.base, "image_path"):
            img, full = load_rgb_draft(self.base.image_path(index), self.draft, self.max_side)
        else:
            img = self.base[index][0]
            full = img.size
            if self.max_side and capped_size(*full, self.max_side) != full:
                img = img.resize(capped_size(*full, self.max_side), Image.BICUBIC)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return torch.from_numpy(np.array(img, dtype=np.uint8)), full, img.size

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, (full_w, full_h), (w, h) = self._image(index)
        torch_seed, py_seed = sample_seeds(self.seed, epoch, index)
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        try:
            torch.default_generator.manual_seed(torch_seed)
            random.seed(py_seed)
            params = sample_params(self.cfg, full_h, full_w)
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)
        scale = torch.tensor([h / full_h, w / full_w], dtype=torch.float64)
        if self.with_target:
            return image, params, scale, self.base[index][1]
        return image, params, scale


# ---------------------------------------------------------------------------------------------
# The plan (worker side): one float32 row per view, everything the device applies
# ---------------------------------------------------------------------------------------------

# The crop box on the canvas axes (rows, columns) in decoded pixels, as a (3, 2) block: starts,
# lengths, flips (reverse the output rows / columns). A portrait image lies transposed on the
# canvas (its rows are the image's columns) and P_TRANS transposes its crops back.
P_Y0, P_X0, P_YLEN, P_XLEN, P_FLIPY, P_FLIPX, P_TRANS = 0, 1, 2, 3, 4, 5, 6
# ColorJitter as N_PASSES passes y = clamp(a x + b gray(x) + c mean(gray(x))), the hue shift
# between pass HUE_AFTER - 1 and HUE_AFTER (see _jitter_plan)
N_PASSES, HUE_AFTER = 6, 3
P_A, P_B, P_C = slice(7, 13), slice(13, 19), slice(19, 25)
P_HUE_ON, P_HUE, P_GRAY, P_BLUR, P_SOLAR = 25, 26, 27, 28, 29
P_KERNEL = 30  # the view's Gaussian taps (2 blur_half + 1 columns; a delta when not blurred)
# normalisation (x - mean) / std as x * C_SCALE + C_SHIFT: one addcmul per crop size
C_GRAY, C_SHIFT, C_SCALE, C_HSV = slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12)
HSV_OFFSETS = (5.0, 3.0, 1.0)


def blur_half(cfg: AugConfig) -> int:
    """Half-width of the Gaussian kernel: 3 sigma of the largest sigma (kernel 13 at sigma 2)."""
    return max(1, math.ceil(3.0 * cfg.blur_sigma[1]))


def _jitter_plan(row: list[float]) -> tuple[list[float], list[float], list[float], float, float]:
    """``(a, b, c, hue_on, hue)`` of one view's ColorJitter in its sampled order.

    Brightness, contrast and saturation are each ``clamp(a x + b gray + c mean)`` (torchvision's
    formulas: brightness (f, 0, 0), contrast (f, 0, 1 - f), saturation (f, 1 - f, 0)); the
    identity is (1, 0, 0), exact. Each view applies hue at most once, so its ops before hue go
    into passes 0-2 and those after it into passes 3-5 with hue in between: six cheap linear
    passes and one hue pass serve every order, where applying each op in each of the 4 order
    slots would cost four hue passes."""
    a, b, c = [1.0] * N_PASSES, [0.0] * N_PASSES, [0.0] * N_PASSES
    if row[JITTER] < 0.5:
        return a, b, c, 0.0, 0.0
    order = [int(k) for k in row[ORDER]]
    factors = row[FACTORS]
    hue_on = not math.isnan(factors[3])
    cut = order.index(3) if hue_on else len(order)
    pre = [k for k in order[:cut] if k != 3]
    post = [k for k in order[cut + 1 :] if k != 3]
    slots = list(range(len(pre))) + [HUE_AFTER + i for i in range(len(post))]
    for slot, k in zip(slots, pre + post):
        f = factors[k]
        if math.isnan(f):
            continue
        a[slot] = f
        if k == 1:
            c[slot] = 1.0 - f
        elif k == 2:
            b[slot] = 1.0 - f
    return a, b, c, float(hue_on), factors[3] if hue_on else 0.0


def plan_rows(
    params: torch.Tensor, scale: torch.Tensor, transposed: bool, half: int = 6
) -> torch.Tensor:
    """``(n_views, P_KERNEL + 2 half + 1)`` float32 plan of one sample from its ``(n_views,
    N_PARAMS)`` parameters, its decode/full size ratio ``(sy, sx)`` and whether it lies
    transposed on the canvas (``half``: ``blur_half(cfg)``). Computed in float64 in the worker."""
    sy, sx = (float(v) for v in scale)
    taps = np.arange(-half, half + 1, dtype=np.float64)
    delta = (taps == 0).astype(np.float64)
    rows = []
    for row in params.tolist():
        box = [row[TOP] * sy, row[HEIGHT] * sy, row[LEFT] * sx, row[WIDTH] * sx]
        if transposed:  # canvas rows are the image's columns
            box = box[2:] + box[:2]
        flip = row[FLIP] > 0.5
        a, b, c, hue_on, hue = _jitter_plan(row)
        if row[BLUR] > 0.5:
            kernel = np.exp(-0.5 * (taps / row[SIGMA]) ** 2)
            kernel /= kernel.sum()
        else:
            kernel = delta
        rows.append(
            [box[0], box[2], box[1], box[3], flip and transposed, flip and not transposed]
            + [transposed, *a, *b, *c, hue_on, hue, row[GRAY], row[BLUR], row[SOLARIZE]]
            + kernel.tolist()
        )
    return torch.tensor(rows, dtype=torch.float64).float()


def batch_consts(cfg: AugConfig) -> torch.Tensor:
    """The constants the device ops need, shipped with each batch (no tensor is created on the
    device during a step)."""
    shift = [-m / s for m, s in zip(cfg.mean, cfg.std)]
    scale = [1.0 / s for s in cfg.std]
    return torch.tensor([*GRAY_WEIGHTS, *shift, *scale, *HSV_OFFSETS], dtype=torch.float32)


# A second canvas must save this share of the batch's pixels to be worth its ~40 extra aten ops;
# with two at most, the augmentation still dispatches fewer ops than the model forward.
CANVAS_SAVING = 0.1
MAX_CANVASES = 2


def canvas_groups(hw: list[tuple[int, int]], max_groups: int = MAX_CANVASES) -> list[list[int]]:
    """Split a batch's images (``(h, w)`` as they lie on the canvas, ``h <= w``) into at most
    ``max_groups`` canvases so that the padded pixels ``sum n_g x max h_g x max w_g`` plus
    ``CANVAS_SAVING`` x (the batch's pixels) per further canvas is least.

    One 1500 x 1125 image among 500 x 375 ones would otherwise pad all of them to its size (and
    the resampling's cost grows with the padded canvas, ~9x): in a canvas of its own it costs
    its own pixels. The search is exact over contiguous runs of the images sorted by (w, h), a
    dynamic programme of ``max_groups x B`` numpy steps. Groups are lists of batch indices, in
    that sorted order."""
    n = len(hw)
    order = sorted(range(n), key=lambda k: (hw[k][1], hw[k][0], k))
    h = np.array([hw[k][0] for k in order], dtype=np.float64)
    w = np.array([hw[k][1] for k in order], dtype=np.float64)
    penalty = CANVAS_SAVING * float((h * w).sum())
    # cost[i, j]: images i..j on one canvas (j >= i); sorted by w, so max w is w[j]
    cost = np.full((n, n), np.inf)
    for j in range(n):
        tallest = np.maximum.accumulate(h[j::-1])[::-1]  # max h over i..j, for i = 0..j
        cost[: j + 1, j] = np.arange(j + 1, 0, -1) * tallest * w[j]
    best = cost[0].copy()  # best[j]: images 0..j on k canvases
    cuts = [np.zeros(n, dtype=np.int64)]
    totals = [best[-1]]
    for _ in range(1, min(max_groups, n)):
        # start the last canvas at i (1..j): the best of images 0..i-1 on one canvas fewer
        cand = best[:-1, None] + cost[1:, :]  # (i - 1, j)
        cut = np.argmin(cand, axis=0) + 1
        best = np.concatenate([[np.inf], cand[cut[1:] - 1, np.arange(1, n)]])
        cuts.append(np.concatenate([[0], cut[1:]]))
        totals.append(best[-1])
    k = int(np.argmin([t + penalty * i for i, t in enumerate(totals)]))
    bounds, j = [], n - 1
    for level in range(k, -1, -1):
        i = int(cuts[level][j]) if level else 0
        bounds.append((i, j))
        j = i - 1
    return [[order[t] for t in range(i, j + 1)] for i, j in reversed(bounds)]


def collate_decoded(batch: list, cfg: AugConfig | None = None) -> dict:
    """A batch for ``device_multicrop``: the uint8 images on ``(B_g, H_g, W_g, 3)`` canvases, one
    per group of ``canvas_groups`` (top-left aligned, portraits transposed, the padding gets
    zero resampling weight) or, for encoded JPEGs, the list to decode on the device; the
    ``(B, n_views, N_PLAN)`` plan, its rows in canvas order; with more than one canvas,
    ``order`` (the batch index of each canvas slot) and ``inverse`` (its inverse permutation,
    which puts the crops back in batch order); with ``cfg``, the constants of ``batch_consts``
    (the trainer's loader passes it: otherwise ``device_multicrop`` copies them from pageable
    memory, a host sync on CUDA). ``params`` and ``scale`` stay on the CPU, in batch order, for
    inspection."""
    images, params, scales = zip(*[b[:3] for b in batch])
    half = blur_half(cfg or AugConfig())
    hw = [tuple(im["hw"]) if isinstance(im, dict) else tuple(im.shape[:2]) for im in images]
    trans = [h > w for h, w in hw]
    plan = torch.stack([plan_rows(p, s, t, half) for p, s, t in zip(params, scales, trans)])
    groups = canvas_groups([(min(h, w), max(h, w)) for h, w in hw], MAX_CANVASES)
    groups = [sorted(g) for g in groups]  # one canvas: the batch order, nothing to undo
    shapes = [(max(min(hw[k]) for k in g), max(max(hw[k]) for k in g)) for g in groups]
    out = {
        **({"consts": batch_consts(cfg)} if cfg is not None else {}),
        "params": torch.stack(params),
        "scale": torch.stack(scales),
    }
    if len(groups) > 1:
        order = torch.tensor([k for g in groups for k in g], dtype=torch.int64)
        out.update(order=order, inverse=torch.argsort(order))
        plan = plan[order]
    out["plan"] = plan
    # the longest crop side of the global and the local views (host numbers: they size the
    # resampling taps, which an outsized canvas would otherwise inflate for every view)
    out["window"] = tuple(
        float(plan[:, sl, P_YLEN : P_XLEN + 1].max()) if plan[:, sl].numel() else 0.0
        for sl in (slice(0, 2), slice(2, None))
    )
    if any(isinstance(im, dict) for im in images):
        out["encoded"] = [im["jpeg"] if isinstance(im, dict) else im for im in images]
        out["hw"], out["groups"], out["canvas_hw"] = hw, groups, shapes
        return out
    canvases = []
    for g, (height, width) in zip(groups, shapes):
        canvas = torch.zeros(len(g), height, width, 3, dtype=torch.uint8)
        for slot, k in enumerate(g):
            im = images[k].transpose(0, 1) if trans[k] else images[k]
            canvas[slot, : im.shape[0], : im.shape[1]] = im
        canvases.append(canvas)
    out["canvases"] = canvases
    return out


def _decode_canvases(batch: dict, device: torch.device) -> list[torch.Tensor]:
    """``data.decode_on: device``: decode the batch's JPEGs with ``torchvision.io.decode_jpeg``
    on ``device`` (nvJPEG on CUDA, in one batched call), shrink those above
    ``data.decode_max_side`` (antialiased bicubic), lay them on their group's canvas."""
    from torchvision.io import ImageReadMode, decode_jpeg

    items, hw = batch["encoded"], batch["hw"]
    jpeg = [k for k, im in enumerate(items) if im.dim() == 1]
    decoded = dict(
        zip(jpeg, decode_jpeg([items[k] for k in jpeg], mode=ImageReadMode.RGB, device=device))
    )
    canvases = []
    for group, shape in zip(batch["groups"], batch["canvas_hw"]):
        canvas = torch.zeros(len(group), *shape, 3, dtype=torch.uint8, device=device)
        for slot, k in enumerate(group):
            h, w = hw[k]
            if k in decoded:
                im = decoded[k]
                if tuple(im.shape[1:]) != (h, w):
                    im = im[None].float()
                    im = F.interpolate(im, size=(h, w), mode="bicubic", antialias=True)
                    im = im[0].round_().clamp_(0, 255).to(torch.uint8)
                im = im.permute(1, 2, 0)
            else:
                im = items[k].to(device, non_blocking=True)
            im = im.transpose(0, 1) if h > w else im
            canvas[slot, : im.shape[0], : im.shape[1]] = im
        canvases.append(canvas)
    return canvases


# ---------------------------------------------------------------------------------------------
# Device ops: batched, float in [0, 1], (N, 3, H, W); per-sample factors are (N,) tensors
# ---------------------------------------------------------------------------------------------


def _bicubic_(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5), Resample.c ``bicubic_filter``, for |x| <= 2 (PIL's 0
    beyond: every tap ``resample_taps`` keeps lies within the support). Overwrites ``x``: the
    tap tensors are the resampling's largest temporaries."""
    x = x.abs_()
    near = (x * 1.5).sub_(2.5).mul_(x).mul_(x).add_(1.0)  # ((a + 2) x - (a + 3)) x^2 + 1
    far = (x - 5.0).mul_(x).add_(8.0).mul_(x).sub_(4.0).mul_(-0.5)  # ((x - 5) x + 8) x - 4) a
    return torch.where(x < 1.0, near, far)


def resample_taps(
    start: torch.Tensor,
    length: torch.Tensor,
    out_size: int,
    in_size: int,
    flip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, weight)``, each ``(N, out_size, taps)``: output pixel x of row n averages input
    pixels ``index[n, x]`` of the interval ``[start, start + length)`` with ``weight[n, x]``, as
    PIL's antialiased bicubic ``resize`` of that crop (Resample.c ``precompute_coeffs``: support
    2 x max(scale, 1), window rounded and clipped to the crop); ``flip`` (bool (N,)) reverses
    the output pixels. ``in_size`` bounds the crops' lengths: ``taps = 4 ceil(in / out) + 3``.

    Taps past a window carry weight 0 and index the window's last pixel, so every index lies
    inside the crop box (and so on the image).
    float64 for the ``(N, out)`` window bounds, which must round exactly as PIL's doubles;
    float32 for the ``(N, out, taps)`` tensors, which dominate the memory (an outsized image
    raises ``taps`` for every view of its group)."""
    start, length = (
        t[:, None] if t.dtype == torch.float64 else t.double()[:, None] for t in (start, length)
    )
    scale = length / out_size
    fscale = scale.clamp(min=1.0)
    x = torch.arange(0.5, out_size, dtype=torch.float64, device=start.device)
    if flip is not None:
        x = torch.where(flip[:, None], out_size - x, x)  # output pixel out - 1 - x
    centre = start + x * scale
    support = 2.0 * fscale  # PIL's order of operations: the bounds round as its doubles
    lo = torch.floor(centre - support + 0.5).maximum(start.round())
    hi = torch.floor(centre + support + 0.5).minimum((start + length).round())
    taps = 4 * math.ceil(max(in_size / out_size, 1.0)) + 3
    k = torch.arange(taps, dtype=torch.float32, device=start.device)
    # tap k is input pixel lo + k, at (lo + k - (centre - 0.5)) / fscale from the centre
    first = ((lo - (centre - 0.5)) / fscale).float()[..., None]
    w = _bicubic_(torch.addcmul(first, k, fscale.reciprocal().float()[..., None]))
    count = (hi - lo).float()[..., None]  # taps in the window
    w.mul_(k < count)
    # taps past the window (weight 0) index its last pixel: every index lies in the crop
    index = torch.minimum(k, count - 1.0).add_(lo.float()[..., None]).long()
    return index, w.div_(w.sum(-1, keepdim=True))


def dense_weights(index: torch.Tensor, weight: torch.Tensor, in_size: int) -> torch.Tensor:
    """``(N, out, in_size)`` matrices from ``resample_taps``' ``(N, out, taps)`` (only the taps
    are computed: no ``(N, out, in)`` temporaries)."""
    return weight.new_zeros(*weight.shape[:2], in_size).scatter_add_(2, index, weight)


def resample_weights(
    start: torch.Tensor,
    length: torch.Tensor,
    out_size: int,
    in_size: int,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N, out_size, in_size)`` float32 resampling matrices of ``resample_taps``."""
    return dense_weights(*resample_taps(start, length, out_size, in_size, flip), in_size)


def rgb_to_grayscale(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's ``0.2989 r + 0.587 g + 0.114 b``; ``weights``: those three as a tensor on
    ``x``'s device (one op instead of five)."""
    if weights is not None:
        return (x * weights.view(1, 3, 1, 1)).sum(-3, keepdim=True)
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


def adjust_hue(
    x: torch.Tensor, f: torch.Tensor, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """torchvision's float HSV round trip with ``h = (h + f) mod 1``, vectorised over channels.

    Hue of the max channel (first on ties: r, g, b, as torchvision's masks): ``(g - b) / cr``,
    ``2 + (b - r) / cr`` or ``4 + (r - g) / cr`` sixths; back to RGB in closed form: channel n is
    ``v - cr clamp(min(k, 4 - k), 0, 1)`` with ``k = n + 6h mod 6``, n = 5, 3, 1 for r, g, b
    (``cr = v s``). ``offsets``: (5, 3, 1) as a tensor on ``x``'s device."""
    if offsets is None:
        offsets = torch.tensor(HSV_OFFSETS, dtype=x.dtype, device=x.device)
    maxc, imax = x.max(-3, keepdim=True)
    cr = maxc - x.amin(-3, keepdim=True)
    diff = x.roll(-1, -3) - x.roll(-2, -3)  # (g - b, b - r, r - g)
    h6 = diff.gather(-3, imax) / cr.clamp(min=1e-30) + 2.0 * imax  # equal channels: 0 / tiny
    h = torch.remainder(h6 / 6.0 + (1.0 + f.view(-1, 1, 1, 1)), 1.0)
    k = torch.remainder(offsets.view(1, 3, 1, 1) + 6.0 * h, 6.0)
    return (maxc - cr * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)).clamp(0.0, 1.0)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian with per-sample ``sigma``, truncated at 3 x ``max_sigma`` (replicate
    edges, as PIL's box blurs): one grouped convolution per axis for the whole batch."""
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


def _columns(plan: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every fixed plan column as an ``(N, 1, 1, 1)`` view (three ops for all of them)."""
    n = plan.shape[0]
    return plan[:, :P_KERNEL].t().reshape(P_KERNEL, n, 1, 1, 1).unbind(0)


def _jitter(x: torch.Tensor, cols: tuple, gray_w: torch.Tensor, hsv: torch.Tensor) -> torch.Tensor:
    """ColorJitter of every view in its own order: N_PASSES masked linear passes with the hue
    pass after HUE_AFTER of them (``_jitter_plan``); identity passes leave x exact."""
    for k in range(N_PASSES):
        if k == HUE_AFTER:
            x = torch.where(cols[P_HUE_ON] > 0.5, adjust_hue(x, cols[P_HUE], hsv), x)
        a, b, c = cols[P_A][k], cols[P_B][k], cols[P_C][k]
        gray = (x * gray_w).sum(-3, keepdim=True)
        t = torch.addcmul(c * gray.mean((-2, -1), keepdim=True), b, gray)
        x = torch.addcmul(t, a, x).clamp_(0.0, 1.0)
    return x


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable blur of each crop with its own ``(N, taps)`` kernel, replicate edges: one
    grouped convolution per axis."""
    n, c, hh, ww = x.shape
    half = kernel.shape[1] // 2
    k = kernel.repeat_interleave(c, 0)  # (n * c, taps)
    y = F.pad(x.reshape(1, n * c, hh, ww), (half, half, half, half), mode="replicate")
    y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
    return F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c).view(n, c, hh, ww)


def photometric_plan(x: torch.Tensor, plan: torch.Tensor, consts: torch.Tensor) -> torch.Tensor:
    """Jitter (per-view order) -> grayscale -> blur -> solarise, as the official Compose, for
    the plan rows of the N crops in ``x``: a fixed sequence of batched ops, each view's
    choice a mask."""
    cols = _columns(plan)
    gray_w = consts[C_GRAY].view(1, 3, 1, 1)
    x = _jitter(x, cols, gray_w, consts[C_HSV])
    gray = (x * gray_w).sum(-3, keepdim=True).expand_as(x)
    x = torch.where(cols[P_GRAY] > 0.5, gray, x)
    x = torch.where(cols[P_BLUR] > 0.5, _blur(x, plan[:, P_KERNEL:]), x)
    return torch.where((cols[P_SOLAR] > 0.5) & (x >= SOLARIZE_THRESHOLD), 1.0 - x, x)


def photometric(x: torch.Tensor, p: torch.Tensor, cfg: AugConfig) -> torch.Tensor:
    """``photometric_plan`` for the ``(N, N_PARAMS)`` CPU parameters of the N crops in ``x``."""
    plan = plan_rows(p, torch.ones(2), False, blur_half(cfg))
    return photometric_plan(x, plan.to(x.device), batch_consts(cfg).to(x.device))


def resized_crops(
    canvases: list[torch.Tensor], plan: torch.Tensor, size: int, window: float = 0.0
) -> torch.Tensor:
    """``(V, B, 3, size, size)`` crops + flips from the float ``(B_g, H_g, W_g, 3)`` canvases
    (values in 0-255, ``sum B_g = B``, in plan order) for the ``(B, V, width)`` plan;
    ``window``: the plan's longest crop side if known (else the canvases' longest side).

    The taps of every view are computed once; then per canvas one matmul per sample with all
    its views' row weights and one batched matmul per view with its column weights, each over
    that canvas's own size."""
    b, v = plan.shape[:2]
    n = b * v
    # sample-major rows then columns of every view: (2, b, v, size, taps)
    start, length, flip = (  # float64 once: the window bounds round as PIL's doubles
        plan[:, :, P_Y0 : P_FLIPX + 1].double().reshape(n, 3, 2).permute(1, 2, 0).reshape(3, 2 * n)
    )
    longest = window or max(max(c.shape[1:3]) for c in canvases)
    index, weight = resample_taps(start, length, size, longest, flip > 0.5)
    weight[:n].div_(255.0)  # the row pass maps 0-255 to 0-1
    iy, ix = index.view(2, b, v * size, -1).unbind(0)
    wy, wx = weight.view(2, b, v * size, -1).unbind(0)
    if len(canvases) > 1:
        counts = [c.shape[0] for c in canvases]
        iy, ix, wy, wx = (t.split(counts) for t in (iy, ix, wy, wx))
    else:
        iy, ix, wy, wx = [iy], [ix], [wy], [wx]
    parts = []
    for canvas, *taps in zip(canvases, iy, ix, wy, wx):
        bk, hh, ww, _ = canvas.shape
        rows = torch.bmm(dense_weights(taps[0], taps[2], hh), canvas.view(bk, hh, ww * 3))
        cols = dense_weights(taps[1], taps[3], ww).view(bk, v, size, ww)
        parts.append(torch.einsum("bvswc,bvpw->vbcsp", rows.view(bk, v, size, ww, 3), cols))
    out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    trans = plan[:, :, P_TRANS].t().reshape(v, b, 1, 1, 1) > 0.5
    return torch.where(trans, out.transpose(-1, -2), out).clamp_(0.0, 1.0)


def device_multicrop(batch: dict, cfg: AugConfig, device: torch.device | str) -> list[torch.Tensor]:
    """``[global1, global2, local_1..local_n]``, each ``(B, 3, s, s)`` float32 normalised on
    ``device``, from a ``collate_decoded`` batch (what ``MultiCropAugmentation`` + the default
    collate give on the CPU path). Host-to-device copies only, and non-blocking: the loader's
    ``pin_memory`` pins the batch.

    Each canvas is resampled on its own (so the cost follows each image's pixels, not the
    largest's); the crops of every canvas then go through one photometric pass in canvas order
    and are put back in batch order by ``inverse``."""
    device = torch.device(device)
    if "encoded" in batch:
        canvases = _decode_canvases(batch, device)
    else:
        canvases = [c.to(device, non_blocking=True) for c in batch["canvases"]]
    plan = batch["plan"].to(device, non_blocking=True)
    regroup = "inverse" in batch  # known on the host: no device value is read
    if regroup:
        inverse = batch["inverse"].to(device, non_blocking=True)
    consts = batch["consts"] if "consts" in batch else batch_consts(cfg)
    consts = consts.to(device, non_blocking=True)
    canvases = [c.float() for c in canvases]
    shift, scale = consts[C_SHIFT].view(1, 3, 1, 1), consts[C_SCALE].view(1, 3, 1, 1)
    b = plan.shape[0]
    out: list[torch.Tensor] = []
    groups = [(cfg.global_size, 0, 2), (cfg.local_size, 2, 2 + int(cfg.n_local))]
    windows = batch.get("window", (0.0, 0.0))
    for (size, first, last), window in zip(groups, windows):
        if last <= first:
            continue
        v = last - first
        group = plan[:, first:last]
        x = resized_crops(canvases, group, size, window).reshape(v * b, 3, size, size)
        x = photometric_plan(x, group.transpose(0, 1).reshape(v * b, -1), consts)  # view-major
        x = torch.addcmul(shift, x, scale).view(v, b, 3, size, size)
        out.extend((x.index_select(1, inverse) if regroup else x).unbind(0))
    return out
