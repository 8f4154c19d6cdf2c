"""``PretrainConfig``: every value of the DINO pretraining recipe, in one place, with its source.

Defaults = the official DINO code's defaults (facebookresearch/dino ``main_dino.py``) plus the
published "boosted" ViT-S/16 settings of its README (``--epochs 300 --teacher_temp 0.07
--warmup_teacher_temp_epochs 30 --norm_last_layer false``), with drop-path 0 as "Cutting the
Skip" (arXiv 2510.00345) requires, and the paper's skipless initialisation (alpha 1.8, beta 1.0,
c 3 for DINO ViT-S).

Sources of a config, later wins: the defaults below, a YAML file (nested like the dataclasses),
then command-line overrides ``key=value`` / ``--key value`` where ``key`` is a dotted path
(``optim.lr``) or an unambiguous leaf name (``lr``, ``teacher_temp``). The loading functions
take the config class (``cls``, default ``PretrainConfig``), so the supervised trainer's
``ClassifyConfig`` is read, overridden and checked the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..data.files import DEFAULT_MAX_IMAGE_PIXELS
from ..data.worlds import WORLDS
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
    check_fields,
)
from .augment import AugConfig
from .decode import ON_ERROR
from .loss import CENTERINGS, KOLEO_FEATURES

PRECISIONS = ("bf16", "fp16", "fp32")
ON_NONFINITE = ("stop", "skip")
AUGMENT_ON = ("auto", "cpu", "device")
DECODE_ON = ("cpu", "device")


class ConfigError(ValueError):
    """A bad config file, key or value (the message says what was expected and where)."""


@dataclass
class ModelConfig:
    """Backbone (paper Sec. 6: ViT-S/16, 12 blocks; the depth study uses 9-12)."""

    arch: str = "vit_small"  # main_dino.py --arch vit_small (paper: ViT-S/16)
    variant: str = "skipless_init"  # paper's method; "skip" = baseline, "skipless" = no init
    patch_size: PositiveInt = 16  # main_dino.py --patch_size 16
    depth: PositiveInt | None = (
        None  # None: the arch's depth (12 for vit_small); paper studies 9-12
    )
    alpha: FiniteFloat = 1.8  # paper Sec. 5 / App.: DINO ViT-S mimetic W_Q W_K^T = alpha Z + beta I
    beta: FiniteFloat = 1.0  # paper, DINO ViT-S
    c: PositiveFloat = 3.0  # paper, DINO ViT-S: W_V, W_O scaled orthonormal with scale c
    drop_path: float = 0.0  # paper: 0 for every variant (official DINO default is 0.1)


@dataclass
class DINOConfig:
    """Head, loss and teacher (official DINOHead / DINOLoss / EMA defaults, boosted ViT-S/16)."""

    out_dim: PositiveInt = 65536  # main_dino.py --out_dim 65536
    norm_last_layer: bool = False  # README boosted ViT-S/16: --norm_last_layer false
    use_bn_in_head: bool = False  # main_dino.py --use_bn_in_head False
    head_nlayers: PositiveInt = 3  # utils.DINOHead nlayers=3
    head_hidden_dim: PositiveInt = 2048  # utils.DINOHead hidden_dim=2048
    head_bottleneck_dim: PositiveInt = 256  # utils.DINOHead bottleneck_dim=256
    momentum_teacher: Probability = 0.996  # main_dino.py --momentum_teacher 0.996 (cosine -> 1)
    warmup_teacher_temp: PositiveFloat = 0.04  # main_dino.py --warmup_teacher_temp 0.04
    teacher_temp: PositiveFloat = 0.07  # README boosted ViT-S/16: --teacher_temp 0.07
    warmup_teacher_temp_epochs: NonNegInt = 30  # README boosted ViT-S/16: 30
    student_temp: PositiveFloat = 0.1  # DINOLoss student_temp=0.1
    center_momentum: Probability = 0.9  # DINOLoss center_momentum=0.9
    # How the teacher's target is made. "centering" (DINO, the published recipe): EMA centre +
    # sharpened softmax. "sinkhorn_knopp" (DINOv2 / SwAV, not in DINO): the batch is spread
    # evenly over the prototypes by sk_iterations rounds of Sinkhorn-Knopp. With koleo_weight
    # 0.1 and a sharper teacher (teacher_temp = warmup_teacher_temp = 0.01) it is the remedy
    # when the random teacher starts with almost no information about low-variety images: on
    # upscaled digits it learns over the whole 48-epoch quickstart, where the published loss
    # and the pair alone collapse (README, "A remedy for low-information images", with the
    # seeds); the collapse alarm names it.
    centering: str = "centering"
    sk_iterations: PositiveInt = 3  # DINOv2 SinkhornKnoppTeacher n_iterations=3
    # Teacher temperature chosen from the measured information at the start (not in DINO):
    # before step 0 both temperatures are scaled down by the largest factor <= 1 at which the
    # initial teacher target carries at least this many nats about the image (README, "A
    # remedy for low-information images"). None: the temperatures as given (the published
    # recipe). Never raises a temperature, so a run already above the target is unchanged.
    teacher_temp_min_info: NonNegFloat | None = None
    # DINOv2's KoLeo term on the student's CLS features of each global view (DINOv2
    # dino.koleo_loss_weight 0.1; not in DINO, so 0 = off by default): spreads the images apart.
    koleo_weight: NonNegFloat = 0.0
    # What the KoLeo term spreads: "backbone" (DINOv2: the backbone's CLS features) or
    # "bottleneck" (not in DINOv2: the head's L2-normalised bottleneck, from which the prototype
    # logits are computed). On low-variety images the collapse happens in the head: the
    # backbone's features of different digits stay apart under KoLeo while the bottleneck
    # becomes one shared direction (README, "A remedy for low-information images").
    koleo_features: str = "backbone"


@dataclass
class OptimConfig:
    """Optimiser and per-iteration schedules (main_dino.py defaults)."""

    optimizer: str = "adamw"  # main_dino.py --optimizer adamw; "soap" = Vyas et al. 2025
    epochs: PositiveInt = 300  # README boosted ViT-S/16 (official default 100)
    lr: PositiveFloat = 0.0005  # main_dino.py --lr 0.0005, scaled by total_batch / 256
    min_lr: NonNegFloat = 1e-6  # main_dino.py --min_lr 1e-6 (cosine target)
    warmup_epochs: NonNegInt = 10  # main_dino.py --warmup_epochs 10 (linear lr warm-up)
    weight_decay: NonNegFloat = 0.04  # main_dino.py --weight_decay 0.04 (cosine start)
    weight_decay_end: NonNegFloat = 0.4  # main_dino.py --weight_decay_end 0.4
    clip_grad: NonNegFloat = 3.0  # main_dino.py --clip_grad 3.0 (per-parameter; 0 = off)
    freeze_last_layer: NonNegInt = 1  # main_dino.py --freeze_last_layer 1 (epochs)
    adamw: AdamWConfig = field(default_factory=AdamWConfig)  # torch AdamW defaults, as DINO
    soap: SOAPConfig = field(default_factory=SOAPConfig)  # official soap.py defaults


@dataclass
class DataConfig:
    """Where images come from and how they are batched."""

    path: str | None = None  # ImageFolder root (ImageNet train); None: a small world below
    # Without --data: which small world (data/worlds.py) -- "patterns" (synthetic surface
    # patterns), "photos" (crops of the photographs scikit-image ships, class = photograph) or
    # "digits" (scikit-learn's 8x8 digits upscaled); synthetic_n / _size / _seed size it.
    world: str = "patterns"
    batch_size_per_gpu: PositiveInt = 64  # main_dino.py --batch_size_per_gpu 64 (x16 GPUs = 1024)
    num_workers: NonNegInt = 10  # main_dino.py --num_workers 10
    pin_memory: bool = True  # main_dino.py DataLoader(pin_memory=True); CUDA only here
    synthetic_n: PositiveInt = 1000  # synthetic fallback: number of scenes (not a published value)
    synthetic_size: PositiveInt = 128  # synthetic fallback: image side in px
    synthetic_seed: NonNegInt = 0  # synthetic fallback: generator seed
    # An unreadable image: "raise" stops with its path; "skip" replaces it by a seeded draw
    # (resume stays exact), counts it, and stops when more than max_bad_fraction of an
    # epoch's samples were bad. Not in DINO (a bad file kills its run).
    on_error: str = "raise"
    max_bad_fraction: Probability = 0.01
    # Where the multi-crop recipe runs. "cpu": the official PIL pipeline in the loader workers,
    # bit-for-bit the published recipe. "device": workers only decode and sample the (identical)
    # random parameters; the crops are computed batched on run.device (dino/augment_device.py;
    # float arithmetic, documented deviations of ~1/255). "auto" (default): "device" on CUDA,
    # where the PIL pipeline would need ~50 CPU-ms per image, "cpu" on a CPU.
    augment_on: str = "auto"
    decode_draft: NonNegInt = 0  # device path: JPEG draft decode keeping sides >= N px (0 = off)
    # Device path: shrink a decoded image whose longer side exceeds N px to N (antialiased, crop
    # boxes rescaled), bounding each image's decode, transfer and resampling (0 = off). An
    # outsized image no longer pads the batch either way: it gets a canvas of its own.
    decode_max_side: NonNegInt = 0
    # Device path: "device" decodes JPEGs in the training process on run.device
    # (torchvision.io.decode_jpeg, nvJPEG on CUDA); "cpu": PIL in the loader workers.
    decode_on: str = "cpu"
    # Decompression-bomb limit: an image with more pixels (read off its header) is a bad image
    # (data.on_error). PIL's Image.MAX_IMAGE_PIXELS; not in DINO (PIL's own error killed a run).
    max_image_pixels: PositiveInt = DEFAULT_MAX_IMAGE_PIXELS


def augment_on_for(data: DataConfig, device: torch.device | str) -> str:
    """ "cpu" or "device": where ``data.augment_on`` puts the crops for a run on ``device``."""
    if data.augment_on != "auto":
        return data.augment_on
    return "device" if torch.device(device).type == "cuda" else "cpu"


@dataclass
class MonitorConfig:
    """Online k-NN monitor (``dino/monitor.py``; solo-learn / lightly style, not in the official
    code): the teacher's CLS features of held-out images scored by DINO's weighted k-NN at step 0,
    every ``knn_every`` epochs and at the end, and the last paired with the first (McNemar). It
    reads the model and never touches the training RNG, so a run's losses are the same with it
    on or off. Bookkeeping: it does not change the method."""

    knn_every: NonNegInt = 10  # epochs between evaluations (0 = off; init and end are always done)
    knn_k: PositiveInt = 20  # DINO eval_knn.py --nb_knn 20 (the reported k)
    knn_temperature: PositiveFloat = 0.07  # DINO eval_knn.py --temperature 0.07
    knn_bank: PositiveInt = 5000  # labelled bank images, at most (a seeded per-class subset)
    knn_queries: PositiveInt = 1000  # held-out query images, at most
    knn_resolution: PositiveInt | None = None  # resize + centre crop side; None: aug.global_size
    knn_batch_size: PositiveInt = 256
    # --data without a val/ sibling: hold knn_queries images (per class, seeded) out of
    # pretraining so that no query is trained on; false: no monitor for such folders.
    knn_holdout: bool = True
    knn_holdout_fraction: FractionBelow1 = 0.1  # of each class's images, at most
    knn_root: str | None = None  # another ImageFolder (train/ + val/, or class folders) to use


@dataclass
class RunConfig:
    """Bookkeeping: output, precision, checkpoints, logging. None of it changes the method."""

    out: str | None = None  # None: runs/<config file stem> or runs/pretrain
    seed: NonNegInt = 0  # main_dino.py --seed 0
    device: str = "auto"  # auto: cuda if available (LOCAL_RANK's GPU under torchrun), else cpu
    # DINO's --use_fp16 True is fp16 + GradScaler; we default to bf16 autocast (no scaler) on
    # CUDA. On CPU autocast is off (fp32) unless precision is fp32 anyway.
    precision: str = "bf16"
    # torch.compile the student and teacher forwards (two graphs, no recompiles); slow to start
    compile: bool = False
    # The teacher forward, student forward and DINO loss as one compiled graph (implies compile;
    # one process only: the loss's centre is all-reduced across processes inside the loss)
    compile_step: bool = False
    # torch.compile's backend: "inductor" (generated kernels), or e.g. "aot_eager" (the same
    # graphs run by eager kernels: scripts/gpu_check.py --tiny checks compilation in seconds)
    compile_backend: str = "inductor"
    # collectives wait this long for the slowest rank (NCCL's default is 600)
    dist_timeout_s: PositiveInt = 1800
    cpu_threads: PositiveInt | None = None  # torch.set_num_threads on CPU (None: torch's default)
    tf32: bool = True  # allow TF32 matmuls/convs on CUDA (fp32 parts of the step)
    saveckp_freq: NonNegInt = 20  # main_dino.py --saveckp_freq 20 (epochs); always at the end too
    keep_epochs: list[int] = field(default_factory=lambda: [200, 300])  # paper evaluates these
    ckpt_every_steps: NonNegInt = 0  # also write checkpoint.pt every N iterations (0 = off)
    max_steps: PositiveInt | None = (
        None  # stop (with a checkpoint) after this global step; for tests
    )
    log_every: PositiveInt = 10  # one log.jsonl record every N iterations (DINO's MetricLogger: 10)
    on_nonfinite: str = "stop"  # "stop" as DINO (sys.exit(1)); "skip": count and go on
    progress: bool = True  # tqdm bar on rank 0
    tensorboard: bool = True  # write DIR/tb if tensorboard is importable
    jacobian_every_epochs: NonNegInt = (
        0  # paper App. A.7 condition numbers every N epochs (0 = off)
    )
    jacobian_tokens: PositiveInt = 16  # tokens of the random input of the condition-number probe
    # Collapse alarm (dino/collapse.py; not in the official code): the teacher target's
    # information about the image (batch-mean entropy minus per-image entropy, nats) below
    # collapse_min_info for collapse_window consecutive steps -> loud warning, or an error
    # with on_collapse=stop. collapse_window=0 switches it off.
    collapse_window: NonNegInt = 100
    collapse_min_info: FiniteFloat = 0.05
    on_collapse: str = "warn"  # "warn" | "stop"


@dataclass
class PretrainConfig:
    """The whole pretraining recipe; ``aug`` is the multi-crop recipe (``AugConfig``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    run: RunConfig = field(default_factory=RunConfig)
    name: str = "pretrain"  # run name (the YAML file's stem); default out dir runs/<name>

    def validate(self) -> PretrainConfig:
        """Every value in its declared range (the field types, ``dino_skipless.ranges``), every
        choice valid, and the relations between fields; ``ConfigError`` names the key."""
        m, o, r = self.model, self.optim, self.run
        try:
            check_fields(self)
            self.aug.check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_choice("model.arch", m.arch, tuple(ARCHS))
        check_choice("model.variant", m.variant, VARIANTS)
        check_choice("optim.optimizer", o.optimizer, OPTIMIZERS)
        check_choice("run.precision", r.precision, PRECISIONS)
        check_choice("run.on_nonfinite", r.on_nonfinite, ON_NONFINITE)
        check_choice("run.on_collapse", r.on_collapse, ("warn", "stop"))
        check_choice("data.on_error", self.data.on_error, ON_ERROR)
        d = self.data
        check_choice("data.augment_on", d.augment_on, AUGMENT_ON)
        check_choice("data.decode_on", d.decode_on, DECODE_ON)
        check_choice("data.world", self.data.world, WORLDS)
        check_choice("dino.centering", self.dino.centering, CENTERINGS)
        check_choice("dino.koleo_features", self.dino.koleo_features, KOLEO_FEATURES)
        device_only = [
            f"data.{k}={v}"
            for k, v, off in (
                ("decode_draft", d.decode_draft, 0),
                ("decode_max_side", d.decode_max_side, 0),
                ("decode_on", d.decode_on, "cpu"),
            )
            if v != off
        ]
        if device_only and d.augment_on == "cpu":
            raise ConfigError(
                f"{', '.join(device_only)} needs data.augment_on=device or auto (the CPU path "
                "decodes at full size with PIL, as the official code)"
            )
        if d.decode_on == "device" and d.decode_draft:
            raise ConfigError(
                "data.decode_draft is a libjpeg option of the worker's decode; with "
                "data.decode_on=device use data.decode_max_side to bound the decoded size"
            )
        if d.augment_on == "device" and d.on_error != "raise":
            raise ConfigError(
                "data.on_error=skip is not supported with data.augment_on=device yet (a bad image "
                "stops the run with its path); use data.augment_on=cpu to skip bad images"
            )
        if m.drop_path != 0:
            raise ConfigError(
                f"model.drop_path={m.drop_path}: only 0 is supported (the paper disables "
                "drop-path in every variant for a fair skip/skipless comparison)"
            )
        if o.warmup_epochs > o.epochs:
            raise ConfigError(
                f"optim.warmup_epochs ({o.warmup_epochs}) exceeds optim.epochs ({o.epochs})"
            )
        for size_key in ("global_size", "local_size"):
            size = getattr(self.aug, size_key)
            if size % m.patch_size:
                raise ConfigError(
                    f"aug.{size_key}={size} is not a multiple of model.patch_size={m.patch_size}"
                )
        return self

    @property
    def n_crops(self) -> int:
        return 2 + int(self.aug.n_local)

    def out_dir(self) -> Path:
        return Path(self.run.out if self.run.out else Path("runs") / self.name)

    def to_dict(self) -> dict:
        return _plain(asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check_choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; expected one of: {', '.join(valid)}")


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, so the dict is YAML/JSON-safe."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Building from dicts, YAML and overrides
# ---------------------------------------------------------------------------------------------


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def leaf_keys(cls=PretrainConfig, prefix: str = "") -> list[str]:
    """Every settable dotted key, e.g. ``optim.adamw.betas``."""
    keys = []
    for name, tp in _hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.extend(leaf_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(key, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if isinstance(value, str) and tp not in (str, Any):
        parsed = yaml.safe_load(value) if value.strip() else value
        if not isinstance(parsed, str):
            value = parsed
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if value is None or isinstance(value, dict | list):
                raise ValueError
            return str(value)
        if origin in (tuple, list):
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v]
            if not isinstance(value, list | tuple):
                raise ValueError
            if origin is tuple:
                if len(args) == 2 and args[1] is Ellipsis:
                    return tuple(_coerce(key, args[0], v) for v in value)
                if len(value) != len(args):
                    raise ValueError
                return tuple(_coerce(key, a, v) for a, v in zip(args, value))
            return [_coerce(key, args[0] if args else Any, v) for v in value]
    except (ValueError, TypeError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{key}: expected {name}, got {value!r}") from None
    return value


def from_dict(cls, data: dict, prefix: str = "", where: str = "config"):
    """Build dataclass ``cls`` from a nested dict; unknown keys raise with the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section {prefix.rstrip('.') or '<top>'} must be a mapping")
    hints = _hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(hints)}"
        )
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v or {}, f"{prefix}{k}.", where)
        else:
            kwargs[k] = _coerce(prefix + k, tp, v)
    try:
        return cls(**kwargs)
    except ValueError as e:  # e.g. AugConfig.__post_init__
        raise ConfigError(f"{where}: {e}") from None


def resolve_key(key: str, cls=PretrainConfig) -> str:
    """Dotted key, or a unique leaf name (``lr`` -> ``optim.lr``); ``-`` counts as ``_``."""
    key = key.strip().replace("-", "_")
    keys = leaf_keys(cls)
    if key in keys:
        return key
    matches = [k for k in keys if k.split(".")[-1] == key or k.endswith("." + key)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"ambiguous config key {key!r}: matches {', '.join(matches)}")
    raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(keys)}")


def set_key(cfg, key: str, value: Any) -> None:
    """``set_key(cfg, 'optim.lr', '1e-3')``: coerced to the field's type, validated later."""
    dotted = resolve_key(key, type(cfg))
    parts = dotted.split(".")
    obj = cfg
    for p in parts[:-1]:
        obj = getattr(obj, p)
    tp = _hints(type(obj))[parts[-1]]
    setattr(obj, parts[-1], _coerce(dotted, tp, value))
    if hasattr(obj, "__post_init__"):  # e.g. AugConfig re-checks its tuples
        try:
            obj.__post_init__()
        except ValueError as e:  # a range of the field types (aug.n_local=-2): no traceback
            raise ConfigError(str(e)) from None


def load_yaml(path: str | Path, cls=PretrainConfig):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected a YAML mapping)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a YAML mapping of config sections (model:, optim:, ...), got a "
            f"{type(data).__name__}"
        )
    data.setdefault("name", path.stem)
    return from_dict(cls, data, where=str(path))


def build_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[tuple[str, Any]] | None = None,
    base=None,
    cls=PretrainConfig,
    validate: bool = True,
):
    """YAML file (or ``base`` or the defaults), then overrides in order, then validation
    (``validate=False``: only the overrides' types are checked, e.g. to find a run's folder
    before its own config is read)."""
    if path is not None:
        cfg = load_yaml(path, cls)
    elif base is not None:
        cfg = from_dict(cls, base.to_dict())
    else:
        cfg = cls()
    items = overrides.items() if isinstance(overrides, dict) else (overrides or [])
    for k, v in items:
        set_key(cfg, k, v)
    return cfg.validate() if validate else cfg


def config_from_dict(data: dict) -> PretrainConfig:
    """Inverse of ``PretrainConfig.to_dict`` (e.g. the config stored in a checkpoint)."""
    return from_dict(PretrainConfig, data, where="checkpoint config")
