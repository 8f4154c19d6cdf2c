"""The hierarchy stage for one model (``evaluate_model``, the library entry point): layer-
similarity maps, their summary numbers, and per-block k-NN and linear-probe scores, from one
forward per image; plus the files of ``python -m dino_skipless.hierarchy`` (``save_results`` /
``load_results``) and their tables. The math is in ``hierarchy_lib``.

What is measured, per model:

* **CKA maps** on the validation images of a segmentation dataset, in a seeded random order, at
  ``resolution`` px: the raw tokens (no final LayerNorm: the residual stream itself is what the
  paper says skips blur) of the patch embedding and of every block's output. Patch tokens:
  ``patch_tokens`` positions per image, drawn once from a seeded generator and shared by every
  depth and every model, are the examples (n = ``batch_images * patch_tokens`` per minibatch);
  CLS tokens: one example per image (n = ``batch_images``). Each minibatch of ``batch_images``
  images adds one unbiased-HSIC matrix per kind; a last, incomplete minibatch and images
  beyond ``max_images`` are left out (``images.dropped``).
* **per-block linear probes**: the probe of ``eval.linprobe`` (``LinProbeConfig``, one lr sweep
  per block) on every block's final-LayerNorm patch features; the validation features are cached
  in the same forward that feeds the CKA, the training features in one forward per image.
* **per-block k-NN**: DINO's weighted k-NN (``KNNConfig``) on every block's final-LayerNorm CLS
  token, from one forward per class-folder image.

At the last block both are the numbers of ``eval.linprobe`` (single block) and ``eval.knn``.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from eval.feature_cache import build_cache
from eval.knn_lib import (
    KNNConfig,
    build_splits,
    eval_transform,
    knn_scores,
    labels_digest,
    resolve_backend,
    top1_se,
    topk_accuracy,
)
from eval.linprobe_lib import masks_digest
from eval.probe_lib import LinProbeConfig, probe_from_cache

from .cli import default_num_workers
from .features import Features, check_input_size, extract
from .fileio import markdown_table, write_json, write_npz
from .hierarchy_lib import (
    DEFAULT_THRESHOLD,
    HAS_EMBEDDING,
    KIND_NAMES,
    KINDS,
    batch_hsic,
    hierarchy_claim,
    summarise,
)

HSIC_FILE = "hsic_batches.npz"


@dataclass
class HierarchyConfig:
    """Defaults of the CKA part of the stage (the probes keep ``LinProbeConfig`` and
    ``KNNConfig``). None of these is published: the paper measures no CKA."""

    # Input side of the CKA and probe images; 448 as the linear probe (LinProbeConfig).
    resolution: int = 448
    # Images per CKA minibatch. Each minibatch's HSIC is unbiased whatever its size, so the size
    # sets memory (the patch Grams are (depth+1) x n^2 floats) and the bootstrap's granularity
    # (its units are minibatches), not the expected value.
    batch_images: int = 16
    # Patch positions sampled per image: n = 16 x 64 = 1024 examples per minibatch, 109 MB of
    # float64 Grams for ViT-S (13 depths). Many images with a few positions each beat few images with all
    # their (correlated) positions.
    patch_tokens: int = 64
    max_images: int | None = None  # CKA on at most this many validation images (None: all)
    threshold: float = DEFAULT_THRESHOLD  # effective depth (hierarchy_lib: why 0.9)
    bootstrap: int = 1000  # resamples of the minibatches for the s.e. (0: none)
    # image order, sampled positions, bootstrap; not the model's seed, so that models of any
    # seed see the same minibatches (hierarchy_claim then pairs them)
    seed: int = 0
    extract_batch_size: int = 16
    num_workers: int = field(default_factory=default_num_workers)

    def __post_init__(self):
        if self.batch_images < 4:
            raise ValueError(f"batch_images must be >= 4 (unbiased HSIC), got {self.batch_images}")
        if self.patch_tokens < 1:
            raise ValueError(f"patch_tokens must be >= 1, got {self.patch_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------- CKA stream


class CKAStream:
    """Collects the tokens of every depth batch by batch and turns each full minibatch of
    ``cfg.batch_images`` images into one ``(R, R)`` unbiased-HSIC matrix per token kind."""

    def __init__(self, cfg: HierarchyConfig):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.buffers: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
        self.buffered = 0
        self.hsic: dict[str, list[np.ndarray]] = {k: [] for k in KINDS}
        self.seen = 0  # images offered
        self.used = 0  # images in a complete minibatch

    def add(self, f: Features) -> None:
        """``f``: raw tokens of every block and the embedding (``extract(..., with_embedding)``)."""
        cap = self.cfg.max_images
        b = f.embedding.shape[0]
        take = b if cap is None else max(0, min(b, cap - self.seen))
        self.seen += b
        if take == 0:
            return
        blocks = [f.tokens[i] for i in sorted(f.tokens)]
        p = f.num_prefix_tokens
        cls = torch.stack([t[:take, 0] for t in blocks])  # (L, B, D)
        patches = torch.stack([f.embedding[:take, p:], *(t[:take, p:] for t in blocks)])
        n_pos = patches.shape[2]
        k = min(self.cfg.patch_tokens, n_pos)
        pos = torch.stack([torch.randperm(n_pos, generator=self.gen)[:k] for _ in range(take)])
        pos = pos.to(patches.device)[None, :, :, None].expand(
            patches.shape[0], -1, -1, patches.shape[-1]
        )
        self.buffers["patch"].append(torch.gather(patches, 2, pos))  # (L+1, B, k, D)
        self.buffers["cls"].append(cls)
        self.buffered += take
        while self.buffered >= self.cfg.batch_images:
            self._flush(self.cfg.batch_images)

    def _flush(self, m: int) -> None:
        for kind in KINDS:
            x = torch.cat(self.buffers[kind], dim=1)
            head, rest = x[:, :m], x[:, m:]
            self.buffers[kind] = [rest] if rest.shape[1] else []
            reps = head.flatten(1, 2) if kind == "patch" else head  # (R, n, D)
            with torch.autocast(reps.device.type, enabled=False):  # float64 throughout
                self.hsic[kind].append(batch_hsic(reps).cpu().numpy())
        self.buffered -= m
        self.used += m

    def result(self) -> dict[str, np.ndarray]:
        """``{kind: (k, R, R)}``; fails when not one minibatch was complete."""
        if not self.hsic["patch"]:
            raise ValueError(
                f"CKA needs at least one minibatch of {self.cfg.batch_images} images; got "
                f"{self.seen} (use more validation images or a smaller --batch-images)"
            )
        return {k: np.stack(v) for k, v in self.hsic.items()}


def stream_extractor(stream: CKAStream):
    """A ``build_cache`` extractor that feeds ``stream`` the raw tokens of every depth and
    returns the final-normed tokens of the cached blocks, from one forward."""

    @torch.no_grad()
    def extractor(model, images, layers, kind="tokens", norm=True):
        f = extract(model, images, range(len(model.blocks)), with_embedding=True)
        stream.add(f)
        tokens = {la: model.norm(f.tokens[la]) if norm else f.tokens[la] for la in layers}
        return Features(tokens, f.grid, f.num_prefix_tokens)

    return extractor


def images_digest(val_masks_digest: str, cfg: HierarchyConfig, n_images: int) -> str:
    """Same images, order, minibatches and sampled positions: what pairing two models needs."""
    key = dict(masks=val_masks_digest, n=n_images, resolution=cfg.resolution, seed=cfg.seed,
               batch_images=cfg.batch_images, patch_tokens=cfg.patch_tokens)  # fmt: skip
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- k-NN


@torch.no_grad()
def block_cls_features(model, dataset, cfg: KNNConfig, device, progress: bool = True):
    """``(L, N, D)`` L2-normalised final-norm CLS tokens of every block, and labels ``(N,)``."""
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    depth = len(model.blocks)
    feats, labels = [], []
    for x, y in tqdm(loader, desc="k-NN features", leave=False, disable=not progress):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = extract(model, x.to(device), range(depth), norm=True)
        feats.append(torch.stack([F.normalize(f.cls(i).float(), dim=1) for i in range(depth)]))
        labels.append(torch.as_tensor(y))
    return torch.cat(feats, dim=1), torch.cat(labels).to(device)


def knn_per_block(model, root, cfg: KNNConfig, device, backend="auto", progress=True) -> dict:
    """Top-1 of the weighted k-NN (``cfg.k[0]``) on every block's CLS token."""
    device = torch.device(device)
    check_input_size(model, cfg.crop, cfg.crop)
    train, val, classes, how = build_splits(Path(root), cfg, eval_transform(cfg))
    tr_f, tr_y = block_cls_features(model, train, cfg, device, progress)
    va_f, va_y = block_cls_features(model, val, cfg, device, progress)
    backend = resolve_backend(backend)
    k = cfg.k[0]
    top1 = []
    for i in range(tr_f.shape[0]):
        s = knn_scores(tr_f[i], tr_y, va_f[i], k, cfg.temperature, len(classes), backend, cfg.chunk)
        top1.append(topk_accuracy(s, va_y, ks=(1,))["top1"])
    return {
        "top1": top1,
        "top1_se": [top1_se(t, len(val)) for t in top1],
        "best_block": int(np.argmax(top1)),
        "k": k,
        "n_train": len(train),
        "n_val": len(val),
        "num_classes": len(classes),
        "split": how,
        "backend": backend,
        "val_digest": labels_digest(va_y.cpu().tolist()),
        "config": cfg.to_dict(),
    }


# ---------------------------------------------------------------------------------- probes


def probe_per_block(train_cache, val_cache, num_classes, class_names, cfg: LinProbeConfig,
                    device, progress=True) -> dict:  # fmt: skip
    """The lr sweep of ``eval.linprobe`` on each cached block alone."""
    blocks = sorted(train_cache.feats)
    stats: dict = {}
    runs = []
    for b in blocks:
        r = probe_from_cache(train_cache, val_cache, [b], num_classes, class_names, cfg, device,
                             stats, progress)  # fmt: skip
        r.pop("per_image_counts", None)
        runs.append(r)
    miou = [r["miou"] for r in runs]
    return {
        "miou": miou,
        "miou_se": [r.get("miou_se") for r in runs],
        "best_lr": [r["best_lr"] for r in runs],
        "pacc": [r["pacc"] for r in runs],
        "per_lr": [r["per_lr"] for r in runs],
        "best_block": int(np.nanargmax(miou)),
        "n_train": len(train_cache),
        "n_val": len(val_cache),
        "config": cfg.to_dict(),
    }


# ---------------------------------------------------------------------------------- one model


def evaluate_model(
    model: torch.nn.Module,
    seg_val,
    cfg: HierarchyConfig,
    *,
    seg_train=None,
    probe_cfg: LinProbeConfig | None = None,
    knn_root=None,
    knn_cfg: KNNConfig | None = None,
    device="cpu",
    cache_dir=None,
    progress: bool = True,
) -> dict:
    """The hierarchy record of one model (module docstring): CKA maps and summaries on
    ``seg_val`` (a segmentation dataset; its images only, unless probing), per-block probes when
    ``seg_train`` and ``probe_cfg`` are given, per-block k-NN when ``knn_root`` (an ImageFolder
    root) and ``knn_cfg`` are. Besides JSON-ready entries the record holds ``hsic_batches``
    ``{kind: (k, R, R)}`` arrays (the input of ``hierarchy_lib.hierarchy_claim``;
    ``save_results`` moves them to ``hsic_batches.npz``).

    The probes cache every block of every training and validation image (fp16: depth x tokens
    x dim x 2 bytes per image, 7.2 MB for ViT-S at 448 px); ``cache_dir`` keeps them in memory-
    mapped files in a temporary folder there (removed afterwards) instead of in memory."""
    if cache_dir is None:
        return _evaluate(model, seg_val, cfg, seg_train, probe_cfg, knn_root, knn_cfg, device,
                         None, progress)  # fmt: skip
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hierarchy-", dir=cache_dir) as tmp:
        return _evaluate(model, seg_val, cfg, seg_train, probe_cfg, knn_root, knn_cfg, device,
                         tmp, progress)  # fmt: skip


def _evaluate(model, seg_val, cfg, seg_train, probe_cfg, knn_root, knn_cfg, device, tmp,
              progress) -> dict:  # fmt: skip
    device = torch.device(device)
    model = model.to(device).eval()
    depth = len(model.blocks)
    check_input_size(model, cfg.resolution, cfg.resolution)
    probing = seg_train is not None and probe_cfg is not None
    blocks = list(range(depth)) if probing else []
    t0 = time.perf_counter()
    order = np.random.default_rng(cfg.seed).permutation(len(seg_val)).tolist()
    stream = CKAStream(cfg)
    # a fresh key per call: a cached val pass would skip the forward that feeds the CKA
    common = dict(batch_size=cfg.extract_batch_size, num_workers=cfg.num_workers, device=device,
                  progress=progress, cache_dir=tmp, key_parts={"run": str(tmp)})  # fmt: skip
    val = build_cache(model, Subset(seg_val, order), blocks, cfg.resolution, train=False,
                      extractor=stream_extractor(stream), desc="val features + CKA", **common)  # fmt: skip
    hsic = stream.result()
    timings = {"val_pass_s": time.perf_counter() - t0}
    record: dict = {"depth": depth, "cka": {}}
    for kind in KINDS:
        emb = HAS_EMBEDDING[kind]
        rec = summarise(hsic[kind], cfg.threshold, cfg.bootstrap, cfg.seed, emb)
        rec["depths"] = (["embed"] if emb else []) + [str(i) for i in range(depth)]
        record["cka"][kind] = rec
    digest = images_digest(masks_digest(val.masks), cfg, stream.used)
    record["images"] = {
        "n_images": stream.used,
        "dropped": stream.seen - stream.used,
        "examples_per_batch": {
            "patch": cfg.batch_images * min(cfg.patch_tokens, val.grid[0] * val.grid[1]),
            "cls": cfg.batch_images,
        },
        "grid": list(val.grid),
        "digest": digest,
    }
    record["images_digest"] = digest
    record["probe"] = record["knn"] = None
    if probing:
        t = time.perf_counter()
        train = build_cache(model, seg_train, blocks, cfg.resolution, train=True,
                            desc="train features", **common)  # fmt: skip
        record["probe"] = probe_per_block(train, val, seg_train.num_classes,
                                          seg_train.class_names, probe_cfg, device, progress)  # fmt: skip
        timings["probe_s"] = time.perf_counter() - t
    del val
    if knn_root is not None and knn_cfg is not None:
        t = time.perf_counter()
        record["knn"] = knn_per_block(model, knn_root, knn_cfg, device, progress=progress)
        timings["knn_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    record["timings"] = timings
    record["hsic_batches"] = hsic
    return record


# ---------------------------------------------------------------------------------- claims


def claims_for(models: list[dict], threshold: float = DEFAULT_THRESHOLD, seed: int = 0) -> list:
    """The claim "skipless_init's blocks are more hierarchical than skip's" (adjacent-block CKA,
    patch and CLS tokens) when ``models`` (with ``backbone`` and ``hsic_batches``) hold exactly
    one model of each of the two variants (JSON-ready dicts): a verdict about these two models
    (image noise only, ``per_model``), not yet about the variants. With more, which are seeds of one
    recipe and which are other models (a run and its own init) is not for the stage to guess:
    group them and call ``hierarchy_claim``."""
    by: dict[str, list[dict]] = {}
    for m in models:
        by.setdefault(m["backbone"]["variant"], []).append(m)
    if len(by.get("skip", [])) != 1 or len(by.get("skipless_init", [])) != 1:
        return []
    out = []
    for kind in KINDS:
        c = hierarchy_claim(by, kind=kind, threshold=threshold, seed=seed, per_model=True)
        c.pop("row")
        out.append(c)
    return out


# ---------------------------------------------------------------------------------- files


def save_results(out_dir, record: dict) -> None:
    """``results.json`` (``record`` with a ``models`` list) and ``hsic_batches.npz`` (each
    model's per-minibatch HSIC, keys ``<i>_<kind>``, plus the run id) in ``out_dir``."""
    out_dir = Path(out_dir)
    arrays = {}
    models = []
    for i, m in enumerate(record["models"]):
        m = dict(m)
        for kind, h in m.pop("hsic_batches").items():
            arrays[f"{i}_{kind}"] = np.asarray(h)
        models.append(m)
    write_npz(out_dir / HSIC_FILE, run_id=np.array(record["run_id"]), **arrays)
    write_json(out_dir / "results.json", _finite({**record, "models": models}))


def _finite(obj):
    """JSON has no NaN: an undefined number (the CLS token's embed_last) is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def load_results(out_dir) -> list[dict]:
    """The model records of a stage's ``out_dir``, each with its ``hsic_batches`` back (the
    input of ``hierarchy_lib.hierarchy_claim``). Refuses files of two different runs."""
    out_dir = Path(out_dir)
    rec = json.loads((out_dir / "results.json").read_text())
    with np.load(out_dir / HSIC_FILE) as z:
        if str(z["run_id"]) != rec["run_id"]:
            raise ValueError(
                f"{out_dir}: {HSIC_FILE} and results.json come from different runs "
                f"({z['run_id']} vs {rec['run_id']})"
            )
        arrays = {k: z[k] for k in z.files}
    return [
        {**m, "hsic_batches": {k: arrays[f"{i}_{k}"] for k in KINDS}}
        for i, m in enumerate(rec["models"])
    ]


# ---------------------------------------------------------------------------------- tables


def _pm(rec: dict, key: str, digits: int = 3) -> str:
    v = rec[key]
    if v is None or not np.isfinite(v):
        return "undefined"
    se = rec.get("bootstrap", {}).get(key, {}).get("se")
    return f"{v:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


SUMMARY_HEADERS = [
    "model", "adjacent CKA, patch", "first→last, patch", "eff. depth, patch",
    "adjacent CKA, CLS", "first→last, CLS", "eff. depth, CLS", "best k-NN block", "best probe block",
]  # fmt: skip


def summary_rows(models: list[dict]) -> list[list]:
    rows = []
    for m in models:
        p, c = m["cka"]["patch"], m["cka"]["cls"]
        knn, probe = m.get("knn"), m.get("probe")
        rows.append([
            m["label"], _pm(p, "adjacent_mean"), _pm(p, "first_last"),
            _pm(p, "effective_depth", 1) + f" / {m['depth']}",
            _pm(c, "adjacent_mean"), _pm(c, "first_last"),
            _pm(c, "effective_depth", 1) + f" / {m['depth'] - 1}",
            f"{knn['best_block']} ({knn['top1'][knn['best_block']]:.1f})" if knn else "–",
            f"{probe['best_block']} ({probe['miou'][probe['best_block']]:.2f})" if probe else "–",
        ])  # fmt: skip
    return rows


def per_block_rows(models: list[dict]) -> tuple[list[str], list[list]]:
    depth = max(m["depth"] for m in models)
    headers = ["model", "per block", *(str(i) for i in range(depth))]
    rows = []
    for m in models:
        p, c = m["cka"]["patch"], m["cka"]["cls"]
        rows.append([m["label"], "CKA with its input, patch", *p["adjacent"]])
        rows.append([m["label"], "CKA with its input, CLS", "–", *c["adjacent"]])
        if m.get("knn"):
            rows.append([m["label"], "k-NN top-1", *m["knn"]["top1"]])
        if m.get("probe"):
            rows.append([m["label"], "probe mIoU", *m["probe"]["miou"]])
    return headers, rows


def results_markdown(record: dict) -> str:
    models = record["models"]
    thr = models[0]["cka"]["patch"]["threshold"] if models else DEFAULT_THRESHOLD
    headers, rows = per_block_rows(models)
    parts = [
        markdown_table(SUMMARY_HEADERS, summary_rows(models)),
        f"Minibatch linear CKA (unbiased HSIC) ± bootstrap s.e. over images; eff. depth: blocks "
        f"whose output is < {thr} CKA-similar to their input. Block 0 of the CLS rows has no "
        "input to compare (the CLS token entering it is the same for every image).",
        markdown_table(headers, rows),
    ]
    if record.get("claims"):
        rows = [[f"{c['claim']}, {KIND_NAMES[c['kind']]}", f"**{c['verdict']}**", c["evidence"]]
                for c in record["claims"]]  # fmt: skip
        parts.append(markdown_table(["claim", "verdict", "evidence"], rows))
    return "\n\n".join(parts) + "\n"
