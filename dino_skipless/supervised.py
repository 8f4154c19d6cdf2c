"""``python -m dino_skipless.supervised``: the supervised ceiling of a small-scale evaluation.

    python -m dino_skipless.supervised --task cls --config configs/quickstart_cpu.yaml \\
        --out runs/sup_cls model.variant=skip
    python -m dino_skipless.supervised --task seg --config configs/quickstart_cpu.yaml \\
        --out runs/sup_seg --seg-seed 1

A random-init backbone is the floor of an evaluation; this is its ceiling: the *same*
architecture trained end to end on the evaluation's own labels with the *same budget* as a DINO
run of that config (images, epochs x iterations, batch, optimiser, lr / weight-decay schedules,
global crop size), then exported as ``OUT/backbone.pt`` + ``.json`` so that every evaluation
stage reads it exactly like a DINO checkpoint (frozen features, ``--ckpt OUT``). The head used
for training is thrown away.

* ``--task cls``: the class folders that DINO pretrains on (``data.path``, or the synthetic
  class folders ``data.synthetic_*``), a linear classifier on the final-norm CLS token. Each
  image gives DINO's two *global* views (same crops, flips, jitter, blur, solarisation); the
  local views are dropped because a 5-40 % crop often misses the object and so destroys the
  label. Ceiling of the k-NN evaluation.
* ``--task seg``: VOC-format synthetic scenes (``--seg-n``, ``--seg-size``, ``--seg-seed``; use
  another seed than the evaluation scenes) or a real VOC root (``--seg-root``), split
  ``trainaug``; a per-patch linear classifier on the final-norm patch tokens, logits upsampled
  bilinearly to the crop (as the linear probe does), cross-entropy with ignore 255. Each image
  gives two views of a random resized crop (global scale) and flip applied to image and mask
  together, with DINO's colour jitter / grayscale / blur / solarisation on the image only.
  Ceiling of the linear probe and TokenCut.

With ``data.augment_on: device`` (as ``configs/quickstart_cpu.yaml``) the views are made as the DINO
run makes them: the loader worker decodes and samples the parameters, the crops and photometric
ops run batched in the training process (``dino/augment_device.py``), with the same parameters
as the PIL path for each (seed, epoch, index); masks are cropped in the worker with the same
boxes and flips (nearest). On 2 cores this is 18 % (cls) and 14 % (seg) faster per step.

The number of optimisation steps is the DINO run's: ``optim.epochs`` x (``data.synthetic_n`` or
the folder's size) / batch, whatever the labelled set's size (the labelled set is cycled).
Nothing here is a published method; it is a measuring stick.

The training itself is the project's one supervised loop (``classifier.loop``: schedule, forward,
non-finite guard, backward, clipping, step), the one the paper's classifier trainer
(``python -m dino_skipless.classify``) runs, and the views are drawn through the same seeded
data layer (``dino.sampling.SeededTransform``). What is the ceiling's own: its views and heads
above, its budget (the DINO config's) and its data order (a seeded shuffle per pass over the
labelled set, cycled to that budget).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF

from .classifier.loop import Loop, LoopState, NonFiniteLossError, TrainStep
from .cli import ArgumentParser, add_debug_arg, cli_main, flag, hold_out_dir
from .data import ImageFolderDataset, build_segmentation_dataset, synthetic_root
from .data.files import set_max_image_pixels
from .data.worlds import pretrain_root
from .dino.augment import GaussianBlur, MultiCropAugmentation, Solarization
from .dino.augment_device import (
    FLIP,
    HEIGHT,
    LEFT,
    TOP,
    WIDTH,
    SeededDecode,
    collate_decoded,
    device_multicrop,
)
from .dino.checkpoint import export_backbone
from .dino.config import PretrainConfig, build_config
from .dino.sampling import SeededTransform
from .dino.schedules import build_schedules
from .errors import UserError
from .fileio import write_json
from .models import build_model
from .optim import build_optimizer, get_param_groups
from .outdir import OutDirError
from .ranges import AT_LEAST_1, NON_NEGATIVE

TASKS = ("cls", "seg")
STAGE = "dino_skipless.supervised"


@dataclass
class SupervisedResult:
    out_dir: Path
    steps: int
    losses: list[float]
    train_accuracy: float  # of the last epoch's steps (pixels for seg)


class _SeededViews(SeededTransform):
    """Two seeded augmented views per labelled sample, reproducible from (seed, epoch, index):
    ``SeededTransform`` indexed like a plain dataset at ``self.epoch`` (the ceilings shuffle with
    a DataLoader)."""

    def __init__(self, base: Dataset, views, seed: int):
        super().__init__(base, views, seed)
        self.epoch = 0

    def __getitem__(self, i: int):
        return super().__getitem__((self.epoch, i))


class _ClsViews:
    """DINO's two global views of the image; the label is kept."""

    def __init__(self, aug: MultiCropAugmentation):
        self.aug = aug

    def __call__(self, img: Image.Image, label: int):
        img = img.convert("RGB")
        return torch.stack([self.aug.global1(img), self.aug.global2(img)]), torch.tensor(
            [label, label]
        )


class _SegViews:
    """Joint random resized crop + flip of image and mask, DINO's photometric ops on the image."""

    def __init__(self, cfg: PretrainConfig):
        a = self.a = cfg.aug
        b, c, s, h = a.jitter
        lo, hi = a.blur_sigma
        photometric = [
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)],
                p=a.jitter_p,
            ),
            transforms.RandomGrayscale(p=a.grayscale_p),
        ]
        norm = [transforms.ToTensor(), transforms.Normalize(a.mean, a.std)]
        self.photometric = [
            transforms.Compose([*photometric, GaussianBlur(a.blur_p_global1, lo, hi), *norm]),
            transforms.Compose(
                [*photometric, GaussianBlur(a.blur_p_global2, lo, hi)]
                + [Solarization(a.solarize_p_global2), *norm]
            ),
        ]

    def _view(self, img: Image.Image, mask: Image.Image, k: int):
        a = self.a
        i, j, h, w = transforms.RandomResizedCrop.get_params(
            img, scale=list(a.global_scale), ratio=list(a.ratio)
        )
        size = [a.global_size, a.global_size]
        img = TF.resized_crop(img, i, j, h, w, size, transforms.InterpolationMode.BICUBIC)
        mask = TF.resized_crop(mask, i, j, h, w, size, transforms.InterpolationMode.NEAREST)
        if torch.rand(1) < a.flip_p:
            img, mask = TF.hflip(img), TF.hflip(mask)
        return self.photometric[k](img), torch.from_numpy(np.asarray(mask, dtype=np.int64))

    def __call__(self, img: Image.Image, mask: np.ndarray):
        m = Image.fromarray(np.asarray(mask, dtype=np.uint8))
        views = [self._view(img.convert("RGB"), m, k) for k in range(2)]
        return torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])


def _collate(batch):
    return torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])


class _DecodedViews(Dataset):
    """``data.augment_on=device``, as in the DINO run of the config: the worker decodes the
    image and samples both global views' parameters (``SeededDecode`` without local views:
    the same draws, in the same order, as ``_ClsViews`` / ``_SegViews``); the crops and the
    photometric ops run batched in the training process (``_device_views``). A mask gets its
    views' boxes and flips here, with nearest resampling, exactly as ``_SegViews`` crops it."""

    def __init__(self, base: Dataset, cfg: PretrainConfig, seed: int, task: str):
        self.aug = replace(cfg.aug, n_local=0)
        self.decode = SeededDecode(base, self.aug, seed, with_target=True)
        self.task, self.epoch = task, 0

    def __len__(self) -> int:
        return len(self.decode)

    def __getitem__(self, i: int):
        pixels, params, scale, target = self.decode[self.epoch, i]
        if self.task == "cls":
            return pixels, params, scale, torch.tensor([target, target])
        m = Image.fromarray(np.asarray(target, dtype=np.uint8))
        size = [self.aug.global_size] * 2
        views = []
        for row in params[:2].tolist():
            box = [int(row[k]) for k in (TOP, LEFT, HEIGHT, WIDTH)]
            v = TF.resized_crop(m, *box, size, transforms.InterpolationMode.NEAREST)
            if row[FLIP] > 0.5:
                v = TF.hflip(v)
            views.append(torch.from_numpy(np.asarray(v, dtype=np.int64)))
        return pixels, params, scale, torch.stack(views)


def _collate_decoded(batch):
    """A ``collate_decoded`` batch, and the targets ``(B, 2, ...)``."""
    return collate_decoded([b[:3] for b in batch]), torch.stack([b[3] for b in batch])


def _device_views(batch, aug, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2B, 3, s, s)`` views and their ``(2B, ...)`` targets, sample-major (image i's two
    views are rows 2i and 2i + 1), as ``_collate`` orders the CPU path's."""
    decoded, y = batch
    g1, g2 = device_multicrop(decoded, aug, device)
    x = torch.stack([g1, g2], 1).flatten(0, 1)
    return x, y.flatten(0, 1).to(device)


def labelled_data(task: str, cfg: PretrainConfig, seg: dict) -> tuple[Dataset, int, int]:
    """(dataset of (image, label), number of classes, images per DINO epoch)."""
    d = cfg.data
    set_max_image_pixels(d.max_image_pixels)  # in the environment: loader workers see it
    if task == "cls":
        # the DINO run's own pretraining images (data.path, or its world), with their labels
        root = d.path or pretrain_root(d.world, d.synthetic_n, d.synthetic_size, d.synthetic_seed)
        base = ImageFolderDataset(root)
        return base, len(base.classes), len(base)
    root = seg.get("root") or synthetic_root("voc", n=seg["n"], size=seg["size"], seed=seg["seed"])
    base = build_segmentation_dataset("voc", root, "trainaug")
    dino_epoch = (
        len(ImageFolderDataset(d.path)) if d.path else d.synthetic_n
    )  # the DINO run's epoch, so both see the same number of images
    return base, 21, dino_epoch


def train_supervised(task: str, cfg: PretrainConfig, seg: dict | None = None) -> SupervisedResult:
    """Train the ceiling model of ``task`` with ``cfg``'s budget; export its backbone."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    cfg.validate()
    seg = seg or {}
    out_dir = cfg.out_dir()
    for name in ("backbone.pt", "backbone.safetensors"):  # as pretraining refuses a new run there
        if (out_dir / name).exists():
            raise OutDirError(
                f"{out_dir / name} exists (an earlier export): choose another --out, or delete "
                "it to train again"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.run.cpu_threads:
        torch.set_num_threads(cfg.run.cpu_threads)
    torch.manual_seed(cfg.run.seed)
    base, n_classes, dino_epoch = labelled_data(task, cfg, seg)
    on_device = cfg.data.augment_on == "device"
    if on_device:
        data = _DecodedViews(base, cfg, cfg.run.seed, task)
    else:
        views = _ClsViews(MultiCropAugmentation(cfg.aug)) if task == "cls" else _SegViews(cfg)
        data = _SeededViews(base, views, cfg.run.seed)
    device = torch.device("cpu")
    bs = cfg.data.batch_size_per_gpu
    niter = dino_epoch // bs  # DINO drops the last partial batch
    total = niter * cfg.optim.epochs

    m, o = cfg.model, cfg.optim
    backbone = build_model(
        m.arch, m.variant, seed=cfg.run.seed, patch_size=m.patch_size,
        img_size=cfg.aug.global_size, depth=m.depth, alpha=m.alpha, beta=m.beta, c=m.c,
    )  # fmt: skip
    head = nn.Linear(backbone.embed_dim, n_classes)
    model = nn.ModuleDict({"backbone": backbone, "head": head})
    optimizer = build_optimizer(o.optimizer, get_param_groups(model), adamw=o.adamw, soap=o.soap)
    sched = build_schedules(
        lr=o.lr, min_lr=o.min_lr, warmup_epochs=o.warmup_epochs, weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end, momentum_teacher=cfg.dino.momentum_teacher,
        epochs=o.epochs, niter_per_ep=niter, total_batch=bs,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.run.seed)
    p = backbone.spec.patch_size

    def batches(epoch: int, skip: int):
        """One pass over the labelled set in a seeded shuffle (the budget cycles it)."""
        data.epoch = epoch
        return DataLoader(
            data, batch_size=bs, shuffle=True, drop_last=True, generator=gen,
            num_workers=cfg.data.num_workers,
            collate_fn=_collate_decoded if on_device else _collate,
        )  # fmt: skip

    def loss_fn(_forward, batch, step: int, k: int):
        x, y = _device_views(batch, data.aug, device) if on_device else batch
        if task == "cls":
            logits = head(backbone(x))
            loss = F.cross_entropy(logits, y)
            return loss, {"hits": (logits.argmax(1) == y).sum().item(), "seen": len(y)}
        tokens = backbone.forward_features(x)[:, backbone.num_prefix_tokens :]
        g = x.shape[-1] // p
        logits = head(tokens).transpose(1, 2).reshape(len(x), n_classes, g, g)
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear")
        loss = F.cross_entropy(logits, y, ignore_index=255)
        valid = y != 255
        hits = (logits.argmax(1)[valid] == y[valid]).sum().item()
        return loss, {"hits": hits, "seen": int(valid.sum())}

    t0 = time.time()
    state = LoopState()
    try:
        Loop(
            step_fn=TrainStep(model, optimizer, sched, device=device, clip_grad=o.clip_grad),
            loss_fn=loss_fn, batches=batches, total_steps=total, steps_per_epoch=max(niter, 1),
            epoch_steps=None, progress=cfg.run.progress, epochs=o.epochs,
        ).run(state)  # fmt: skip
    except NonFiniteLossError as e:  # a user's lr, not a bug: one line, no traceback
        raise UserError(f"{e} (nothing written)") from None
    losses, step = state.losses, state.step
    # the training accuracy of the last epoch's steps (pixels for seg)
    correct, seen = state.last_stats.get("hits", 0), state.last_stats.get("seen", 0)
    export_backbone(backbone, out_dir)
    acc = correct / max(seen, 1)
    write_json(
        out_dir / "summary.json",
        {
            "task": task,
            "steps": step,
            "final_loss": losses[-1] if losses else None,
            "train_accuracy_last_epoch": acc,
            "n_labelled": len(base),
            "num_classes": n_classes,
            "time_s": time.time() - t0,
            "config": cfg.to_dict(),
            "seg_data": seg,
        },
    )
    return SupervisedResult(out_dir, step, losses, acc)


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m dino_skipless.supervised",
        description="Supervised ceiling: the same ViT and budget as a DINO config, trained on "
        "labels, exported like a DINO backbone.",
    )
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--config", default=None, help="the DINO recipe whose budget to match")
    p.add_argument("--out", required=True)
    p.add_argument("--seg-root", default=None, help="--task seg: a VOC root (default: synthetic)")
    p.add_argument(
        "--seg-n", type=flag(int, AT_LEAST_1), default=1336, help="synthetic VOC scenes (3/4 "
        "trainaug)"
    )  # fmt: skip
    p.add_argument("--seg-size", type=flag(int, AT_LEAST_1), default=96)
    p.add_argument(
        "--seg-seed",
        type=flag(int, NON_NEGATIVE),
        default=1,
        help="not the evaluation scenes' seed",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    add_debug_arg(p)
    args = p.parse_args(argv)
    bad = [kv for kv in args.overrides if "=" not in kv]
    if bad:
        p.error(f"expected key=value config overrides, got {' '.join(bad)}")
    overrides = [tuple(kv.split("=", 1)) for kv in args.overrides]
    cfg = build_config(args.config, [*overrides, ("run.out", args.out)])
    hold_out_dir(args.out, STAGE, report=None)
    seg = {"root": args.seg_root, "n": args.seg_n, "size": args.seg_size, "seed": args.seg_seed}
    r = train_supervised(args.task, cfg, seg if args.task == "seg" else None)
    print(
        json.dumps({"out": str(r.out_dir), "steps": r.steps, "final_loss": r.losses[-1],
                    "train_accuracy_last_epoch": r.train_accuracy})
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
