"""Online k-NN monitor: is the run learning? (as solo-learn's and lightly's online k-NN)

Every ``monitor.knn_every`` epochs, at step 0 (the run's own random init, exported to
``RUN/init``) and at the end, the *teacher* backbone's final-norm CLS features of held-out
images are scored by DINO's weighted k-NN (``dino_skipless.knn``: k = 20, T = 0.07, the vote of
``python -m eval.knn``) against a bank of labelled images. Each evaluation goes to
``knn.jsonl`` (top-1, per-query hits), ``log.txt`` and the progress bar; at the end the last
evaluation is paired with the one at init on the same queries (exact McNemar) and the run says
in one line whether it learned: ``k-NN 62.2 vs 46.4 at init (+15.8 ± 1.3, z 12)``.

Where the images come from (``monitor_sets``):

* no ``data.path``: the world's held-out images (``data/worlds.py``): patterns, another seed's
  images (the same generator, none pretrained on); photos, crops of the photographs'
  validation regions against the training crops; digits, a per-class split;
* ``data.path`` with a sibling ``val/`` holding the same class folders (the ImageNet layout):
  queries from ``val/``, the bank a seeded per-class subset of the pretraining images (DINO's
  eval_knn protocol: the bank *is* the training set);
* otherwise ``monitor.knn_holdout`` (default on) takes the queries out of the pretraining
  folder (seeded, per class, at most ``knn_holdout_fraction`` = 10 % of a class), so no query is
  ever trained on; the rest is the bank.

A folder without classes (fewer than two), or too small to spare ``MIN_QUERIES`` images, has
nothing to score: the monitor is skipped, with a line saying so. Images are decoded once, resized (bicubic, short side) and centre-cropped to
``monitor.knn_resolution`` (default: the global crop size) and kept as uint8, so an evaluation
is only forward passes: ``knn_every`` and the two set sizes bound its cost (README: measured at
under 10 % of the CPU recipe's training time).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..data import ImageFolderDataset
from ..data.files import load_rgb
from ..data.worlds import knn_root_of
from ..features import IMAGENET_MEAN, IMAGENET_STD
from ..knn import knn_scores
from ..stats import paired_hits
from .config import PretrainConfig

KNN_LOG = "knn.jsonl"
MIN_QUERIES = 10  # fewer held-out images than this: no monitor (its test could show nothing)
LEARNED_Z = 3.0  # "learned": the final k-NN beats the init's by at least 3 paired s.e.


def split_per_class(
    targets, n_first: int, seed: int, max_fraction: float = 1.0
) -> tuple[list[int], list[int]]:
    """Seeded per-class split of indices: about ``n_first`` in all for the first part (spread
    evenly over the classes; of each class at most ``max_fraction`` of its images, rounded
    down, and never all of them), the rest second."""
    targets = np.asarray(targets)
    classes = np.unique(targets)
    rng = np.random.default_rng(seed)
    per_class = -(-n_first // max(len(classes), 1))  # ceil
    first, rest = [], []
    for c in classes:
        ids = np.flatnonzero(targets == c)
        ids = ids[rng.permutation(len(ids))]
        k = min(per_class, max(len(ids) - 1, 0), int(max_fraction * len(ids)))
        first += ids[:k].tolist()
        rest += ids[k:].tolist()
    return sorted(first), sorted(rest)


def subsample(indices: list[int], n: int, seed: int) -> list[int]:
    """At most ``n`` of ``indices`` (seeded), in order."""
    if len(indices) <= n:
        return list(indices)
    rng = np.random.default_rng(seed)
    return sorted(np.asarray(indices)[rng.permutation(len(indices))[:n]].tolist())


@dataclass
class MonitorSets:
    """The bank and the queries (paths and labels), and what the pretraining must leave out."""

    bank: list[tuple[Path, int]]
    queries: list[tuple[Path, int]]
    source: str  # one line for the log


def _pairs(ds: ImageFolderDataset, idx: list[int]) -> list[tuple[Path, int]]:
    return [(ds.samples[i][0], ds.samples[i][1]) for i in idx]


def _val_sibling(cfg: PretrainConfig, pretrain: ImageFolderDataset) -> ImageFolderDataset | None:
    """``val/`` beside a ``--data .../train`` folder, with the same class folders."""
    path = Path(cfg.data.path)
    val = path.parent / "val"
    if path.name != "train" or not val.is_dir():
        return None
    vds = ImageFolderDataset(val)
    return vds if vds.classes == pretrain.classes else None


def holdout_split(
    cfg: PretrainConfig, pretrain: ImageFolderDataset
) -> tuple[list[int], list[int]] | None:
    """(query indices, indices left to pretrain on) when the monitor must hold its queries out
    of ``--data`` (a class folder without a ``val/`` sibling); None otherwise. Every process
    computes the same split (seeded)."""
    m = cfg.monitor
    if not cfg.data.path or m.knn_root or not m.knn_holdout or len(pretrain.classes) < 2:
        return None
    if _val_sibling(cfg, pretrain) is not None:
        return None
    queries, rest = split_per_class(
        pretrain.targets, m.knn_queries, cfg.run.seed, m.knn_holdout_fraction
    )
    if len(queries) < MIN_QUERIES:
        return None  # too few images to spare; monitor_sets then skips the monitor
    return queries, rest


def monitor_sets(
    cfg: PretrainConfig,
    pretrain: ImageFolderDataset,
    held: tuple[list[int], list[int]] | None = None,
) -> MonitorSets | None:
    """Where the monitor's images come from (see the module docstring); None: no classes.

    ``held``: ``holdout_split``'s queries, taken *before* ``pretrain`` was restricted to the
    rest (their indices refer to the unrestricted folder's order, re-scanned here)."""
    m, d, seed = cfg.monitor, cfg.data, cfg.run.seed
    if m.knn_root:
        root = Path(m.knn_root)
        if (root / "train").is_dir() and (root / "val").is_dir():
            return _train_val(ImageFolderDataset(root / "train"), ImageFolderDataset(root / "val"),
                              m, seed, f"monitor.knn_root={m.knn_root} (train/ + val/)")  # fmt: skip
        return _split(ImageFolderDataset(root), m, seed, f"monitor.knn_root={m.knn_root}")
    if not d.path:
        world = d.world
        if world == "patterns":
            n = m.knn_bank + m.knn_queries
            ds = ImageFolderDataset(knn_root_of(world, n, d.synthetic_size, d.synthetic_seed))
            return _split(ds, m, seed, f"{n} pattern images of seed {d.synthetic_seed + 1}")
        root = knn_root_of(world, d.synthetic_n, d.synthetic_size, d.synthetic_seed)
        if world == "photos":
            return _train_val(ImageFolderDataset(root / "train"), ImageFolderDataset(root / "val"),
                              m, seed, "photos world: val-region crops vs train-region crops")  # fmt: skip
        return _split(ImageFolderDataset(root), m, seed, f"{world} world, per-class split")
    if len(pretrain.classes) < 2:
        return None
    val = _val_sibling(cfg, pretrain)
    if val is not None:
        return _train_val(pretrain, val, m, seed, f"queries from {val.root}, bank from --data")
    if held is None:
        return None  # no val/ folder and too few images to hold any out
    full = ImageFolderDataset(d.path)
    bank = [full.samples[i] for i in subsample(held[1], m.knn_bank, seed + 1)]
    queries = [full.samples[i] for i in held[0]]
    return MonitorSets(
        bank, queries, f"{len(queries)} images held out of --data (monitor.knn_holdout)"
    )


def _train_val(train, val, m, seed: int, source: str) -> MonitorSets:
    bank = subsample(range(len(train)), m.knn_bank, seed + 1)
    queries = subsample(range(len(val)), m.knn_queries, seed)
    return MonitorSets(_pairs(train, bank), _pairs(val, queries), source)


def _split(ds: ImageFolderDataset, m, seed: int, source: str) -> MonitorSets | None:
    if len(ds.classes) < 2:
        return None
    queries, rest = split_per_class(ds.targets, m.knn_queries, seed)
    return MonitorSets(_pairs(ds, subsample(rest, m.knn_bank, seed + 1)), _pairs(ds, queries),
                       source)  # fmt: skip


class _Decoded(Dataset):
    """uint8 ``(3, S, S)``: bicubic resize of the short side to S, centre crop (eval.knn's)."""

    def __init__(self, items: list[tuple[Path, int]], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        im = load_rgb(path)  # the pipeline's reader: 16-bit/float by range, bombs refused
        w, h = im.size
        s = self.size / min(w, h)
        im = im.resize((max(self.size, round(w * s)), max(self.size, round(h * s))),
                       Image.Resampling.BICUBIC)  # fmt: skip
        w, h = im.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        im = im.crop((left, top, left + self.size, top + self.size))
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1), label


def _decode_all(items, size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    loader = DataLoader(_Decoded(items, size), batch_size=256, num_workers=workers)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


class KNNMonitor:
    """The decoded bank and queries, and ``evaluate(backbone)``."""

    def __init__(self, sets: MonitorSets, cfg: PretrainConfig, device: torch.device):
        m = cfg.monitor
        self.k, self.temperature, self.batch = m.knn_k, m.knn_temperature, m.knn_batch_size
        self.size = m.knn_resolution or cfg.aug.global_size
        self.device = device
        self.source = sets.source
        workers = min(cfg.data.num_workers, os.cpu_count() or 1)
        t0 = time.perf_counter()
        self.bank_x, self.bank_y = _decode_all(sets.bank, self.size, workers)
        self.query_x, self.query_y = _decode_all(sets.queries, self.size, workers)
        self.num_classes = int(max(self.bank_y.max(), self.query_y.max())) + 1
        self.decode_s = time.perf_counter() - t0
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def describe(self) -> str:
        return (
            f"k-NN monitor: {len(self.bank_y)} bank / {len(self.query_y)} query images at "
            f"{self.size}px ({self.source}), {self.k}-NN T={self.temperature}"
        )

    @torch.no_grad()
    def _features(self, backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x), self.batch):
            xb = (x[i : i + self.batch].to(self.device).float() - self.mean) / self.std
            out.append(F.normalize(backbone(xb).float(), dim=1))
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, backbone: torch.nn.Module) -> dict:
        """Top-1 of the queries and their per-image hits (a string of 0/1)."""
        t0 = time.perf_counter()
        was_training = backbone.training
        backbone.eval()
        try:
            bank = self._features(backbone, self.bank_x)
            queries = self._features(backbone, self.query_x)
        finally:
            backbone.train(was_training)
        y = self.bank_y.to(self.device)
        k = min(self.k, len(bank))
        scores = knn_scores(bank, y, queries, k, self.temperature, self.num_classes, "torch")
        hits = (scores.argmax(1).cpu() == self.query_y).numpy()
        return {
            "knn_top1": 100.0 * float(hits.mean()),
            "knn_k": k,
            "knn_n_bank": len(bank),
            "knn_n_query": len(hits),
            "knn_time_s": time.perf_counter() - t0,
            "knn_hits": "".join("1" if h else "0" for h in hits),
        }


def learned_verdict(init: dict, final: dict, collapsed_since: int | None = None) -> dict:
    """The final evaluation against the one at init, paired on the same queries.

    ``collapsed_since``: the step from which the run sits collapsed at its end (the collapse
    alarm). Such a run did not learn, whatever the k-NN says: with an uninformative target the
    DINO loss has (almost) no gradient, and weight decay alone still moves the features (a
    digits run collapsed from step 134 to its end "gained" +6.1 k-NN points, z 3.3)."""
    a = [c == "1" for c in final["knn_hits"]]
    b = [c == "1" for c in init["knn_hits"]]
    t = paired_hits(a, b)
    beats = t["z"] is not None and t["z"] >= LEARNED_Z
    learned = beats and collapsed_since is None
    return {
        "final_top1": t["top1_a"],
        "init_top1": t["top1_b"],
        "diff": t["diff"],
        "se": t["diff_se"],
        "z": t["z"],
        "p": t["p_value"],
        "n": t["n"],
        "beats_init": beats,
        "collapsed_since": collapsed_since,
        "learned": learned,
    }


def verdict_line(v: dict) -> str:
    """``k-NN 62.2 vs 46.4 at init (+15.8 ± 1.3, z 12): learned``."""
    z = f"z {v['z']:.1f}" if v["z"] is not None else "no discordant images"
    head = (
        f"k-NN {v['final_top1']:.1f} vs {v['init_top1']:.1f} at init "
        f"({v['diff']:+.1f} ± {v['se']:.1f}, {z}, p {v['p']:.2g}; {v['n']} held-out images)"
    )
    if v["learned"]:
        return f"{head}: the run learned (beats its own init by >= {LEARNED_Z:g} s.e.)"
    if v.get("collapsed_since") is not None:
        return (
            f"{head}: did NOT learn: the run sits collapsed since step {v['collapsed_since']} "
            "(collapse alarm), so the k-NN change is not DINO learning; see README 'A remedy "
            "for low-information images'"
        )
    return (
        f"{head}: NOT measurably better than its own init (needs >= {LEARNED_Z:g} s.e.); "
        "train longer, or see README 'Does the trainer learn?'"
    )
