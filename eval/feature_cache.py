"""Frozen-backbone patch features, extracted once per image and cached as fp16 grids.

The backbone runs once per image for the union of the blocks any probe needs; single-block and
multiscale probes then read their blocks from the same cache. Images are resized to
``resolution x resolution`` (bilinear, ImageNet-normalised), so the patch grid is
``resolution / patch``. Targets:

* train: the mask resized to ``resolution x resolution`` (nearest), where the training loss is
  computed on bilinearly upsampled logits;
* val: the mask at its original size (label resolution), where logits are upsampled for the
  confusion matrix.

In memory by default; with ``cache_dir`` the arrays are ``.npy`` memmaps keyed by the caller's
``key_parts`` (``eval.linprobe_lib``: the sha256 of the weights file loaded, the backbone spec,
the content digest of the split's image and mask files), resolution and blocks, and are reused
by later runs (e.g. another learning-rate sweep over the same checkpoint). The key is content:
a checkpoint overwritten with ``cp`` or masks replaced in place make a new cache.

While loading, mask pixels outside the dataset's label set (``sample_counted``) are counted per
file (``meta["unknown_labels"]``, kept with a disk cache): they read as ignore, so the caller
warns about them and refuses a split where they are more than a small fraction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dino_skipless.features import IMAGENET_MEAN, IMAGENET_STD, extract
from dino_skipless.fileio import atomic_write_text

CACHE_VERSION = 2  # 2: keyed on content (1 was a stat of the checkpoint path)
UNKNOWN_FILES_KEPT = 20  # files named in meta["unknown_labels"] (the most affected first)


class ResizedSegmentation(Dataset):
    """``(image (3, R, R) normalised float, mask)``; mask resized to R x R (nearest) when
    ``resize_mask`` (training), else kept at label resolution (validation)."""

    def __init__(self, base, resolution: int, resize_mask: bool, counted: bool = False):
        self.base = base
        self.resolution = int(resolution)
        self.resize_mask = resize_mask
        # counted: a third item, the mask's pixels outside the label set (0 if the base cannot
        # tell)
        self.counted = counted
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if self.counted and hasattr(self.base, "sample_counted"):
            img, mask, unknown = self.base.sample_counted(i)
        else:
            (img, mask), unknown = self.base[i], 0
        r = self.resolution
        img = img.convert("RGB").resize((r, r), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        x = (x - self.mean) / self.std
        if self.resize_mask:
            mask = np.asarray(Image.fromarray(np.asarray(mask, np.uint8)).resize((r, r), 0))
        m = torch.from_numpy(np.array(mask, dtype=np.uint8, copy=True))
        return (x, m, (unknown, int(np.asarray(mask).size))) if self.counted else (x, m)


def _collate(batch):
    out = torch.stack([b[0] for b in batch]), [b[1] for b in batch]
    return (*out, [b[2] for b in batch]) if len(batch[0]) == 3 else out


def unknown_label_stats(counts: Sequence[tuple[int, int]], names: Sequence[str]) -> dict:
    """``{"pixels", "total", "n_files", "files": [[name, pixels], ...]}`` of the per-image
    ``(unknown pixels, mask pixels)``, the most affected files first."""
    bad = sorted(
        ((names[i], u) for i, (u, _) in enumerate(counts) if u), key=lambda t: (-t[1], t[0])
    )
    return {
        "pixels": int(sum(u for u, _ in counts)),
        "total": int(sum(t for _, t in counts)),
        "n_files": len(bad),
        "files": [[n, int(u)] for n, u in bad[:UNKNOWN_FILES_KEPT]],
    }


@dataclass
class FeatureCache:
    """Per-block fp16 patch grids ``feats[layer]: (N, D, h, w)`` and the targets.

    ``masks``: ``(N, R, R)`` uint8 for a training cache, a list of ``(H_i, W_i)`` uint8 tensors
    (label resolution) for a validation cache. ``passes``: images the backbone processed to
    build this cache (0 when read back from disk).
    """

    feats: dict[int, torch.Tensor]
    masks: torch.Tensor | list[torch.Tensor]
    resolution: int
    grid: tuple[int, int]
    passes: int = 0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.masks)

    def features(self, idx, layers: Sequence[int]) -> torch.Tensor:
        """``(B, sum D, h, w)`` fp16: the blocks' grids concatenated along channels (on the
        cache's device)."""
        idx = idx.to(self.feats[layers[0]].device) if torch.is_tensor(idx) else idx
        return torch.cat([self.feats[layer][idx] for layer in layers], dim=1)

    def nbytes(self, layers: Sequence[int]) -> int:
        return sum(self.feats[la].numel() * self.feats[la].element_size() for la in layers)

    def on_device(self, layers: Sequence[int], device: torch.device, fraction: float = 0.5):
        """A view of this cache with ``layers`` moved to a CUDA device when they fit in
        ``fraction`` of its free memory (no host-to-device copy per step); else ``self``."""
        device = torch.device(device)
        if device.type != "cuda":
            return self
        free, _ = torch.cuda.mem_get_info(device)
        if self.nbytes(layers) > fraction * free:
            return self
        feats = {la: torch.as_tensor(self.feats[la]).to(device) for la in layers}
        return FeatureCache(feats, self.masks, self.resolution, self.grid, self.passes, self.meta)

    @property
    def dims(self) -> dict[int, int]:
        return {k: int(v.shape[1]) for k, v in self.feats.items()}


def cache_key(parts: dict) -> str:
    blob = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _open_disk(folder: Path, key_parts: dict) -> FeatureCache | None:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != key_parts:
        return None
    feats = {
        int(k): torch.from_numpy(np.load(folder / f"layer{k}.npy", mmap_mode="c"))
        for k in meta["layers"]
    }
    if meta["train"]:
        masks = torch.from_numpy(np.load(folder / "masks.npy", mmap_mode="c"))
    else:
        flat = np.load(folder / "masks_flat.npy", mmap_mode="c")
        shapes = np.load(folder / "mask_shapes.npy")
        offs = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])])
        masks = [
            torch.from_numpy(np.array(flat[offs[i] : offs[i + 1]]).reshape(shapes[i]))
            for i in range(len(shapes))
        ]
    return FeatureCache(feats, masks, meta["resolution"], tuple(meta["grid"]), 0, meta)


def build_cache(
    model: torch.nn.Module,
    dataset,
    layers: Sequence[int],
    resolution: int,
    *,
    train: bool,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
    key_parts: dict | None = None,
    extractor: Callable = extract,
    desc: str = "features",
    progress: bool = True,
) -> FeatureCache:
    """Run ``model`` once over ``dataset`` (a SegmentationDataset: ``(PIL, mask)`` items) and
    cache the final-norm patch grids of ``layers`` (DINO's ``get_intermediate_layers``)."""
    layers = sorted(set(int(x) for x in layers))
    device = torch.device(device)
    folder = None
    key_parts = {**(key_parts or {}), "layers": layers, "res": resolution, "train": train}
    key = cache_key(key_parts)
    if cache_dir is not None:
        folder = Path(cache_dir) / key
        hit = _open_disk(folder, json.loads(json.dumps(key_parts, default=str)))
        if hit is not None:
            return hit
        folder.mkdir(parents=True, exist_ok=True)
    ds = ResizedSegmentation(dataset, resolution, resize_mask=train, counted=True)
    n = len(ds)
    if n == 0:
        raise ValueError(f"{desc}: the dataset is empty")
    loader = DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate
    )
    model = model.to(device).eval()
    feats: dict[int, torch.Tensor] = {}
    mmaps: list[np.memmap] = []
    masks_train = None
    masks_val: list[torch.Tensor] = []
    grid = None
    passes = 0
    start = 0
    unknown: list[tuple[int, int]] = []
    amp = device.type == "cuda"
    for x, m, u in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
        unknown += u
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            f = extractor(model, x.to(device, non_blocking=True), layers, kind="tokens", norm=True)
        passes += x.shape[0]
        b = x.shape[0]
        if grid is None:
            grid = tuple(f.grid)
            for layer in layers:
                shape = (n, f.tokens[layer].shape[-1], *grid)
                if folder is not None:
                    arr = np.lib.format.open_memmap(
                        folder / f"layer{layer}.npy", mode="w+", dtype=np.float16, shape=shape
                    )
                    mmaps.append(arr)
                    feats[layer] = torch.from_numpy(arr)
                else:
                    feats[layer] = torch.empty(shape, dtype=torch.float16)
            if train:
                masks_train = torch.empty((n, resolution, resolution), dtype=torch.uint8)
        for layer in layers:
            feats[layer][start : start + b] = f.patch_grid(layer).to("cpu", torch.float16)
        if train:
            masks_train[start : start + b] = torch.stack(m)
        else:
            masks_val.extend(m)
        start += b
    masks = masks_train if train else masks_val
    names = [
        str(dataset.mask_path(i)) if hasattr(dataset, "mask_path") else str(i) for i in range(n)
    ]
    meta = {
        "layers": layers,
        "resolution": resolution,
        "grid": list(grid),
        "train": train,
        "cache_key": key,
        "unknown_labels": unknown_label_stats(unknown, names),
    }
    if folder is not None:
        for arr in mmaps:
            arr.flush()
        if train:
            np.save(folder / "masks.npy", masks_train.numpy())
        else:
            shapes = np.array([tuple(t.shape) for t in masks_val], dtype=np.int64)
            np.save(folder / "mask_shapes.npy", shapes)
            np.save(
                folder / "masks_flat.npy",
                np.concatenate([t.reshape(-1).numpy() for t in masks_val]),
            )
        meta["key"] = json.loads(json.dumps(key_parts, default=str))
        # meta.json last: its presence marks a complete cache.
        atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))
    return FeatureCache(feats, masks, resolution, grid, passes, meta)
