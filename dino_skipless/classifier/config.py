"""``ClassifyConfig``: the supervised recipe of "Cutting the Skip" Sec. 6.1, every value with its source.

The paper trains ViT-B/16 on ImageNet-1k and "follows the setup in (Xu et al., 2024), except
that [...] we disable the drop path". Xu et al. is "Initializing Models with Larger Ones"
(ICLR 2024), code ``github.com/OscarXZQ/weight-selection``; the defaults below are that code's
``main.py`` argparse defaults, its ``datasets.py`` / ``optim_factory.py`` / ``engine.py``, and its
README's ImageNet-1k command (``--epochs 300 --batch_size 128 --lr 4e-3 --update_freq 4
--use_amp true`` on 8 GPUs: total batch 128 x 8 x 4 = 4096). Cited below as ``main.py``,
``README``, etc. The init constants are the paper's for ViT-B (alpha 2, beta 0.6, c 3,
``PAPER_INIT_DEFAULTS["supervised_vit_base"]``).

Where the paper and that code are silent (documented here, not tuned):

* **SOAP** (Table 1's second column): the official ``soap.py`` defaults (``optim.soap``) with the
  recipe's lr schedule and weight decay; the paper gives no SOAP hyper-parameter.
* **lr at another total batch**: ``main.py`` takes ``--lr`` as given ("4e-3, with total batch size
  4096") and never rescales it. Here ``optim.lr`` is the value *at* ``optim.lr_batch`` (4096) and
  is scaled linearly with the total batch (``lr x total_batch / lr_batch``, the rule of DeiT and
  DINO), so the paper's run (4096) gets exactly 4e-3.
* **precision**: the README runs fp16 autocast + loss scaling (``--use_amp true``); the default
  here is bf16 autocast on GPUs (``run.precision=fp16`` is the official choice), fp32 on CPUs.
* **which top-1**: ``main.py`` prints the last epoch's and the best epoch's val top-1; the paper
  does not say which Table 1 reports. Both are in ``summary.json`` (``top1``, ``best_top1``).

Loading (YAML, overrides, errors) is ``dino.config``'s, with ``cls=ClassifyConfig``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..dino.config import PRECISIONS, ConfigError, _plain, check_choice
from ..dino.config import build_config as _build_config
from ..dino.config import from_dict as _from_dict
from ..dino.config import leaf_keys as _leaf_keys
from ..init import PAPER_INIT_DEFAULTS
from ..models import ARCHS, VARIANTS
from ..optim import OPTIMIZERS, AdamWConfig, SOAPConfig
from ..ranges import (
    FiniteFloat,
    FractionBelow1,
    NonNegFloat,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Range,
    check_fields,
)

_INIT = PAPER_INIT_DEFAULTS["supervised_vit_base"]  # paper Sec. 6.1: alpha 2, beta 0.6, c 3
MIXUP_MODES = ("batch", "pair", "elem")  # timm Mixup
RE_MODES = ("const", "rand", "pixel")  # timm RandomErasing
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "random")
CropFraction = Annotated[float, Range(gt=0, le=1)]  # resize to crop / crop_pct, centre crop


@dataclass
class ModelConfig:
    """ViT-B/16 (paper Sec. 6.1: 12 layers, 12 heads of 64, width 768) + a linear head."""

    arch: str = "vit_base"  # paper Sec. 6.1: ViT-Base
    variant: str = "skipless_init"  # "skip": standard ViT-B; "skipless": no residuals, timm init
    patch_size: PositiveInt = 16  # ViT-B/16 (main.py's vit_base: patch_size=16)
    depth: int | None = None  # None: the arch's (12)
    img_size: PositiveInt = 224  # main.py --input_size 224
    alpha: FiniteFloat = _INIT["alpha"]  # paper Sec. 6.1: W_Q W_K^T = alpha Z + beta I, alpha = 2
    beta: FiniteFloat = _INIT["beta"]  # paper Sec. 6.1: beta = 0.6
    c: PositiveFloat = _INIT["c"]  # paper Sec. 6.1: W_V, W_O scaled orthonormal, c = 3
    drop_path: float = 0.0  # paper: disabled "for a fair comparison" (main.py default 0 too)


@dataclass
class AugConfig:
    """Training transform: ``timm.data.create_transform(is_training=True, ...)`` as datasets.py."""

    scale: tuple[PositiveFloat, PositiveFloat] = (
        0.08,
        1.0,
    )  # timm RandomResizedCrop default (main.py sets none)
    ratio: tuple[PositiveFloat, PositiveFloat] = (3.0 / 4.0, 4.0 / 3.0)  # timm default
    hflip: Probability = 0.5  # timm create_transform default
    # main.py --color_jitter 0.4; timm switches colour jitter off when RandAugment is on, so it
    # is passed through but has no effect in this recipe (as in the official run)
    color_jitter: NonNegFloat = 0.4
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # main.py --aa (RandAugment)
    interpolation: str = "bicubic"  # main.py --train_interpolation bicubic
    re_prob: Probability = 0.25  # main.py --reprob 0.25 (random erasing)
    re_mode: str = "pixel"  # main.py --remode pixel
    re_count: NonNegInt = 1  # main.py --recount 1
    mean: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # main.py: ImageNet defaults
    std: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)


@dataclass
class MixupConfig:
    """``timm.data.Mixup`` as main.py builds it; label smoothing lives in its targets."""

    mixup_alpha: NonNegFloat = 0.8  # main.py --mixup 0.8
    cutmix_alpha: NonNegFloat = 1.0  # main.py --cutmix 1.0
    cutmix_minmax: tuple[float, float] | None = None  # main.py --cutmix_minmax None
    prob: Probability = 1.0  # main.py --mixup_prob 1.0
    switch_prob: Probability = 0.5  # main.py --mixup_switch_prob 0.5
    mode: str = "batch"  # main.py --mixup_mode batch
    label_smoothing: FractionBelow1 = 0.1  # main.py --smoothing 0.1
    correct_lam: bool = True  # timm Mixup default (main.py does not set it)

    @property
    def active(self) -> bool:
        """main.py: ``mixup > 0 or cutmix > 0 or cutmix_minmax is not None``."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None


@dataclass
class OptimConfig:
    """Optimiser and per-iteration schedules (main.py + utils.cosine_scheduler)."""

    optimizer: str = "adamw"  # main.py --opt adamw; "soap": Table 1's second column
    epochs: PositiveInt = 300  # main.py --epochs 300 (README command)
    lr: PositiveFloat = 4e-3  # main.py --lr 4e-3 "with total batch size 4096"
    lr_batch: PositiveInt = 4096  # the total batch lr is given for; scaled linearly (module doc)
    min_lr: NonNegFloat = 1e-6  # main.py --min_lr 1e-6 (cosine target)
    warmup_epochs: NonNegInt = (
        50  # main.py --warmup_epochs 50, linear from 0 (start_warmup_value 0)
    )
    weight_decay: NonNegFloat = 0.05  # main.py --weight_decay 0.05
    weight_decay_end: NonNegFloat = (
        0.05  # main.py --weight_decay_end None -> = weight_decay (constant)
    )
    # optim_factory.get_parameter_groups: no decay on 1-D params, biases and the model's
    # no_weight_decay() = {pos_embed, cls_token, dist_token} (ViT-B has no dist_token)
    no_weight_decay: list[str] = field(default_factory=lambda: ["pos_embed", "cls_token"])
    clip_grad: NonNegFloat = 0.0  # main.py --clip_grad None: no clipping (0 = off)
    layer_decay: float = 1.0  # main.py --layer_decay 1.0: none (only 1.0 is supported)
    model_ema: bool = False  # main.py --model_ema False (only False is supported)
    adamw: AdamWConfig = field(default_factory=AdamWConfig)  # main.py: (0.9, 0.999), eps 1e-8
    soap: SOAPConfig = field(default_factory=SOAPConfig)  # official soap.py defaults


@dataclass
class DataConfig:
    """ImageFolder root with ``train/`` and ``val/`` (main.py --data_set IMNET), or synthetic."""

    path: str | None = None  # ROOT with train/ and val/; None: synthetic pattern classes
    batch_size_per_gpu: PositiveInt = 128  # README ImageNet command: --batch_size 128 (x 8 GPUs)
    accum_steps: PositiveInt = (
        4  # README: --update_freq 4 (gradient accumulation): 128 x 8 x 4 = 4096
    )
    num_workers: NonNegInt = 10  # main.py --num_workers 10
    pin_memory: bool = True  # main.py --pin_mem True
    # synthetic fallback (not published): the pattern-class images of the small-scale world,
    # train and val drawn with different seeds
    synthetic_n: PositiveInt = 1000
    synthetic_val_n: PositiveInt = 500
    synthetic_size: PositiveInt = 64
    synthetic_seed: int = 0
    synthetic_val_seed: int = 1


@dataclass
class EvalConfig:
    """Validation top-1 / top-5 (engine.evaluate) on resize -> centre crop (datasets.py)."""

    every_epochs: PositiveInt = 1  # main.py evaluates after every epoch; always after the last
    crop_pct: CropFraction = (
        0.875  # datasets.py: crop_pct None -> 224/256: resize 256, centre crop 224
    )
    interpolation: str = "bicubic"  # datasets.py: Resize(..., BICUBIC)
    batch_size_per_gpu: PositiveInt | None = None  # None: int(1.5 x train batch), as main.py


@dataclass
class RunConfig:
    """Bookkeeping: output, precision, checkpoints, logging. None of it changes the method."""

    out: str | None = None  # None: runs/<config file stem>
    seed: int = 0  # main.py --seed 0
    device: str = "auto"  # cuda if available (LOCAL_RANK's GPU under torchrun), else cpu
    precision: str = "bf16"  # README: --use_amp true (fp16 + loss scaling); bf16 here, CPU fp32
    compile: bool = False  # torch.compile the model's forward (GPU; slow to start)
    cpu_threads: PositiveInt | None = None  # torch.set_num_threads on CPU (None: torch's default)
    tf32: bool = True  # TF32 matmuls on CUDA for the fp32 parts
    ckpt_every_steps: NonNegInt = (
        0  # also write checkpoint.pt every N steps (0: at epoch ends only)
    )
    max_steps: int | None = None  # stop (with a checkpoint) after this step; for tests
    log_every: PositiveInt = 10  # a log.jsonl record every N steps (engine.py print_freq 10)
    on_nonfinite: str = "stop"  # engine.py stops on a non-finite loss; "skip": count, go on
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True  # DIR/tb if tensorboard is importable


@dataclass
class ClassifyConfig:
    """The whole supervised recipe (defaults: the paper's ViT-B/16 ImageNet run)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    name: str = "classify"  # run name (the YAML file's stem); default out dir runs/<name>

    def validate(self) -> ClassifyConfig:
        """Every value in its declared range (the field types, ``dino_skipless.ranges``: NaN
        and inf never pass), every choice valid, and the relations between fields."""
        m, o, d, r, mx, a = self.model, self.optim, self.data, self.run, self.mixup, self.aug
        try:
            check_fields(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_choice("model.arch", m.arch, tuple(ARCHS))
        check_choice("model.variant", m.variant, VARIANTS)
        check_choice("optim.optimizer", o.optimizer, OPTIMIZERS)
        check_choice("run.precision", r.precision, PRECISIONS)
        check_choice("run.on_nonfinite", r.on_nonfinite, ("stop", "skip"))
        check_choice("mixup.mode", mx.mode, MIXUP_MODES)
        check_choice("aug.re_mode", a.re_mode, RE_MODES)
        check_choice("aug.interpolation", a.interpolation, INTERPOLATIONS)
        check_choice("eval.interpolation", self.eval.interpolation, INTERPOLATIONS[:3])
        positive = {
            "optim.epochs": o.epochs,
            "optim.lr_batch": o.lr_batch,
            "data.batch_size_per_gpu": d.batch_size_per_gpu,
            "data.accum_steps": d.accum_steps,
            "model.patch_size": m.patch_size,
            "model.img_size": m.img_size,
            "eval.every_epochs": self.eval.every_epochs,
            "run.log_every": r.log_every,
            "data.synthetic_n": d.synthetic_n,
            "data.synthetic_val_n": d.synthetic_val_n,
        }
        for key, value in positive.items():
            if int(value) <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value}")
        if self.eval.batch_size_per_gpu is not None and self.eval.batch_size_per_gpu <= 0:
            raise ConfigError(
                f"eval.batch_size_per_gpu must be positive or null, got {self.eval.batch_size_per_gpu}"
            )
        if not 0 <= o.warmup_epochs <= o.epochs:
            raise ConfigError(
                f"optim.warmup_epochs ({o.warmup_epochs}) must be in [0, optim.epochs={o.epochs}]"
            )
        if m.img_size % m.patch_size:
            raise ConfigError(
                f"model.img_size={m.img_size} is not a multiple of model.patch_size={m.patch_size}"
            )
        if m.drop_path != 0:
            raise ConfigError(
                f"model.drop_path={m.drop_path}: only 0 is supported (the paper disables drop "
                "path in every variant for a fair skip/skipless comparison)"
            )
        if o.layer_decay != 1.0:
            raise ConfigError(
                f"optim.layer_decay={o.layer_decay}: only 1.0 (none, as the recipe) is supported"
            )
        if o.model_ema:
            raise ConfigError("optim.model_ema=true is not supported (the recipe uses no EMA)")
        if o.lr <= 0 or o.min_lr < 0 or o.weight_decay < 0 or o.clip_grad < 0:
            raise ConfigError(
                "optim.lr must be > 0 and optim.min_lr, optim.weight_decay, optim.clip_grad >= 0; "
                f"got {o.lr}, {o.min_lr}, {o.weight_decay}, {o.clip_grad}"
            )
        for key, p in {
            "mixup.prob": mx.prob,
            "mixup.switch_prob": mx.switch_prob,
            "aug.hflip": a.hflip,
            "aug.re_prob": a.re_prob,
        }.items():
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{key} is a probability in [0, 1], got {p}")
        if not 0.0 <= mx.label_smoothing < 1.0:
            raise ConfigError(f"mixup.label_smoothing must be in [0, 1), got {mx.label_smoothing}")
        if mx.active and d.batch_size_per_gpu % 2:
            raise ConfigError(
                f"data.batch_size_per_gpu={d.batch_size_per_gpu} is odd: timm's Mixup/CutMix "
                "pairs each image with the batch flipped, so the batch must be even"
            )
        for key in ("scale", "ratio"):
            lo, hi = getattr(a, key)
            if not 0 < lo <= hi:
                raise ConfigError(f"aug.{key} must be (lo, hi) with 0 < lo <= hi, got {(lo, hi)}")
        if not 0 < self.eval.crop_pct <= 1:
            raise ConfigError(f"eval.crop_pct must be in (0, 1], got {self.eval.crop_pct}")
        if d.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
        if a.auto_augment:
            _check_auto_augment(a.auto_augment)
        return self

    @property
    def eval_batch(self) -> int:
        return self.eval.batch_size_per_gpu or int(1.5 * self.data.batch_size_per_gpu)

    def out_dir(self) -> Path:
        return Path(self.run.out if self.run.out else Path("runs") / self.name)

    def to_dict(self) -> dict:
        return _plain(asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_auto_augment(spec: str) -> None:
    from timm.data.auto_augment import rand_augment_transform

    if not spec.startswith("rand"):
        raise ConfigError(
            f"aug.auto_augment={spec!r}: only timm's RandAugment strings ('rand-...') are "
            "supported (the recipe's is rand-m9-mstd0.5-inc1)"
        )
    try:
        rand_augment_transform(spec, {"translate_const": 100})
    except Exception as e:  # timm raises assertion/value errors on a bad string
        raise ConfigError(
            f"aug.auto_augment={spec!r} is not a timm RandAugment string: {e}"
        ) from None


def leaf_keys() -> list[str]:
    return _leaf_keys(ClassifyConfig)


def build_config(path=None, overrides=None, base: ClassifyConfig | None = None) -> ClassifyConfig:
    """YAML file (or ``base`` or the defaults), then ``key=value`` overrides, then validation."""
    return _build_config(path, overrides, base, cls=ClassifyConfig)


def config_from_dict(data: dict) -> ClassifyConfig:
    """Inverse of ``ClassifyConfig.to_dict`` (e.g. the config stored in a checkpoint)."""
    return _from_dict(ClassifyConfig, data, where="checkpoint config")
