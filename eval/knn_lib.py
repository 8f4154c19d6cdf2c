"""DINO's weighted k-NN evaluation as a library (Caron et al. 2021, ``eval_knn.py``): the vote,
the neighbour search, the data splits and CLS features, and the ``results.json`` record of
``python -m eval.knn`` (protocol in that module's docstring).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T
from tqdm import tqdm

from dino_skipless.cli import default_num_workers
from dino_skipless.data import DatasetError, ImageFolderDataset, synthetic_root
from dino_skipless.data.worlds import world_root
from dino_skipless.digest import digest_of, files_digest, require_same_data
from dino_skipless.features import IMAGENET_MEAN, IMAGENET_STD
from dino_skipless.fileio import markdown_table
from dino_skipless.knn import (  # noqa: F401  (the k-NN math, shared with the trainer's monitor)
    faiss_available,
    knn_scores,
    knn_vote,
    search_faiss,
    search_torch,
    top1_se,
    topk_accuracy,
)
from tokencut.corloc import mcnemar_exact, paired_diff_se

STAGE = "eval.knn"  # the stage that writes these results.json (dino_skipless.outdir)


@dataclass
class KNNConfig:
    """DINO eval_knn defaults."""

    k: tuple[int, ...] = (20,)  # DINO reports 20-NN (and sweeps 10, 20, 100, 200)
    temperature: float = 0.07
    resize: int = 256  # short side, bicubic
    crop: int = 224
    batch_size: int = 64
    chunk: int = 256  # test images per similarity chunk
    val_fraction: float = 0.2  # only when the root has no train/val split
    split_seed: int = 0
    num_workers: int = field(default_factory=default_num_workers)  # 4, at most the CPU count

    def to_dict(self) -> dict:
        return asdict(self)


def labels_digest(labels: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()[:16]


SAME_DATA_HINT = "use the same --root (or --dataset synthetic --synthetic-*) and --val-fraction"


def val_data_digest(val, classes: Sequence[str]) -> dict[str, str]:
    """``{"images", "labels"}``: content digests of the validation image files and of their
    class names, in order (``paired_knn`` pairs only runs whose digests agree)."""
    if isinstance(val, Subset):
        paths = [val.dataset.image_path(i) for i in val.indices]
        labels = [classes[val.dataset.targets[i]] for i in val.indices]
    else:
        paths = [val.image_path(i) for i in range(len(val))]
        labels = [classes[t] for t in val.targets]
    return {"images": files_digest(paths), "labels": digest_of(labels)}


def paired_knn(a: dict, b: dict) -> dict:
    """Exact McNemar test of two k-NN ``results.json`` on the same validation images; runs
    whose ``data_digest`` differ are refused (``DataMismatch``), runs without one (older) are
    paired on their label digest, with ``data_warning`` saying so."""
    for r, name in ((a, "A"), (b, "B")):
        if "val_correct" not in r:
            raise ValueError(f"k-NN result {name} has no per-image 'val_correct' (older run?)")
    warning = require_same_data(a.get("data_digest"), b.get("data_digest"), SAME_DATA_HINT)
    if a.get("val_digest") != b.get("val_digest") or len(a["val_correct"]) != len(b["val_correct"]):
        raise ValueError("the two k-NN runs were scored on different validation images")
    ca, cb = np.asarray(a["val_correct"], bool), np.asarray(b["val_correct"], bool)
    only_a, only_b = int((ca & ~cb).sum()), int((~ca & cb).sum())
    return {
        "top1_a": 100 * float(ca.mean()),
        "top1_b": 100 * float(cb.mean()),
        "diff": 100 * float(ca.mean() - cb.mean()),
        "diff_se": paired_diff_se(only_a, only_b, len(ca)),
        "only_a": only_a,
        "only_b": only_b,
        "p_value": mcnemar_exact(only_a, only_b),
        "n": len(ca),
        "data_warning": warning,
    }  # fmt: skip


class PixelBaseline(torch.nn.Module):
    """Raw pixels as features: area-downsample to ``size`` x ``size`` and flatten."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, self.size).flatten(1)


# ---------------------------------------------------------------------------------- data


def split_indices(targets: Sequence[int], val_fraction: float, seed: int):
    """Per-class seeded split: (train indices, val indices); every class with >= 2 images gets
    at least one of each."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    tr, va = [], []
    for c in np.unique(targets):
        ids = np.flatnonzero(targets == c)
        ids = ids[rng.permutation(len(ids))]
        n_val = int(round(len(ids) * val_fraction))
        if len(ids) >= 2:
            n_val = min(max(n_val, 1), len(ids) - 1)
        va += ids[:n_val].tolist()
        tr += ids[n_val:].tolist()
    return sorted(tr), sorted(va)


def build_splits(root: Path, cfg: KNNConfig, transform):
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = ImageFolderDataset(root / "train", transform)
        val = ImageFolderDataset(root / "val", transform)
        if train.classes != val.classes:
            raise DatasetError(
                f"{root}: train/ and val/ have different class folders "
                f"({len(train.classes)} vs {len(val.classes)})"
            )
        return train, val, train.classes, "train/val folders"
    ds = ImageFolderDataset(root, transform)
    tr, va = split_indices(ds.targets, cfg.val_fraction, cfg.split_seed)
    return Subset(ds, tr), Subset(ds, va), ds.classes, f"seeded split {cfg.val_fraction}"


def eval_transform(cfg: KNNConfig):
    return T.Compose(
        [
            T.Resize(cfg.resize, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(cfg.crop),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@torch.no_grad()
def extract_cls(model, dataset, cfg: KNNConfig, device, progress=True):
    """L2-normalised final-norm CLS features ``(N, D)`` and labels ``(N,)``."""
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    feats, labels = [], []
    for x, y in tqdm(loader, desc="features", leave=False, disable=not progress):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = model(x.to(device))
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).to(device)


# ---------------------------------------------------------------------------------- stage


def knn_root(dataset: str, root=None, synthetic: dict | None = None) -> Path:
    """The ImageFolder root: ``root``, or for a small world the cached images it scores
    (``synthetic``: ``n``, ``size``, ``seed``; ``root`` is then the cache folder): ``synthetic``,
    the pattern class folders of that seed; ``photos``, the photographs' train/val crops;
    ``digits``, the upscaled digits (``dino_skipless/data/worlds.py``)."""
    if dataset == "synthetic":
        return synthetic_root("imagefolder", cache_dir=root, **(synthetic or {}))
    if dataset in ("photos", "digits"):
        s = synthetic or {}
        return world_root(dataset, s.get("n", 1000), s.get("size", 96), s.get("seed", 0), root)
    if root is None:
        raise SystemExit("give --root IMAGEFOLDER (or --dataset synthetic|photos|digits)")
    return Path(root)


def check_splits(root, train, val, classes) -> None:
    """Refuse splits whose accuracy would mean nothing: a single class (every vote is right,
    100 % by construction) or no validation image."""
    if len(classes) < 2:
        raise DatasetError(
            f"{root}: k-NN needs at least 2 classes (class folders), found {len(classes)} "
            f"({', '.join(classes) or 'none'}); one class scores 100 % by construction"
        )
    if len(val) == 0 or len(train) == 0:
        raise DatasetError(
            f"{root}: no {'validation' if len(val) == 0 else 'training'} images after the split "
            f"({len(train)} train, {len(val)} val): give train/ and val/ folders or "
            "classes of at least 2 images each"
        )


def resolve_backend(backend: str) -> str:
    return "faiss" if backend == "faiss" or (backend == "auto" and faiss_available()) else "torch"


def run_knn(
    model, root, cfg: KNNConfig, device, backend: str = "auto", progress: bool = True
) -> dict:
    """Features of both splits, then the k-NN vote for every ``cfg.k``: top-1/top-5 per k and
    the per-image top-1 hits of the first (reported) k."""
    t0 = time.perf_counter()
    train, val, classes, how = build_splits(Path(root), cfg, eval_transform(cfg))
    check_splits(root, train, val, classes)
    k_used = {str(k): min(k, len(train)) for k in cfg.k}
    for k in cfg.k:
        if k > len(train):
            print(
                f"k-NN: k={k} is more than the {len(train)} training images: every one of them "
                f"votes (recorded as k_used={len(train)})",
                file=sys.stderr,
            )
    tr_f, tr_y = extract_cls(model, train, cfg, device, progress)
    va_f, va_y = extract_cls(model, val, cfg, device, progress)
    t1 = time.perf_counter()
    backend = resolve_backend(backend)
    per_k, correct = {}, None
    for k in cfg.k:
        s = knn_scores(tr_f, tr_y, va_f, k, cfg.temperature, len(classes), backend, cfg.chunk)
        per_k[str(k)] = topk_accuracy(s, va_y, ks=(1, min(5, len(classes))))
        if correct is None:  # the reported k
            correct = (s.argmax(1) == va_y.to(s.device)).int().cpu().tolist()
    return {
        "per_k": per_k,
        "k_used": k_used,
        "correct": correct,
        "n_train": len(train),
        "n_val": len(val),
        "num_classes": len(classes),
        "split": how,
        "backend": backend,
        "t0": t0,
        "features_s": t1 - t0,
        "val_digest": labels_digest(va_y.cpu().tolist()),
        "data_digest": val_data_digest(val, classes),
    }


def knn_record(
    run: dict,
    cfg: KNNConfig,
    *,
    run_id: str,
    root,
    label: str,
    checkpoint,
    spec,
    device,
    command: str,
) -> dict:
    """``results.json``: accuracies of the reported k (``cfg.k[0]``) and of every k, the split,
    the backbone and config, and the per-image hits and the label and data digests for
    ``paired_knn``."""
    main_k = str(cfg.k[0])
    top1 = run["per_k"][main_k]["top1"]
    return {
        "stage": STAGE,
        "run_id": run_id,
        **{"top1": top1, "top5": list(run["per_k"][main_k].values())[-1]},
        "top1_se": top1_se(top1, run["n_val"]),
        "k": cfg.k[0],
        "k_used": run["k_used"][main_k],  # k, or every training image when there are fewer
        "k_used_per_k": run["k_used"],
        "per_k": run["per_k"],
        "n_train": run["n_train"],
        "n_val": run["n_val"],
        "num_classes": run["num_classes"],
        "split": run["split"],
        "root": str(root),
        "label": label,
        "checkpoint": checkpoint,
        "backbone": spec.to_dict() if spec is not None else None,
        "config": cfg.to_dict(),
        "backend": run["backend"],
        "device": str(device),
        "command": command,
        "timings": {"features_s": run["features_s"], "total_s": time.perf_counter() - run["t0"]},
        "val_correct": run["correct"],
        "val_digest": run["val_digest"],
        "data_digest": run["data_digest"],
    }


def knn_table(record: dict) -> str:
    used = record.get("k_used_per_k", {})

    def k_text(k: str) -> str:
        return k if int(used.get(k, k)) == int(k) else f"{k} (all {used[k]} train images)"

    rows = [
        [record["label"], k_text(k), record["config"]["temperature"], v["top1"]]
        + [list(v.values())[-1]]
        for k, v in record["per_k"].items()
    ]
    return markdown_table(["ckpt", "k", "T", "top-1", "top-5"], rows)
