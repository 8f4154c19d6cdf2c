"""The dense linear-probe stage as a library (paper Sec. 6.2.1): datasets, one feature
extraction shared by every requested probe, the probes (``probe_lib``), and the files of
``python -m eval.linprobe`` (layout in that module's docstring).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dino_skipless.cli import label_for
from dino_skipless.data import DatasetError, build_segmentation_dataset, synthetic_root
from dino_skipless.digest import segmentation_digest
from dino_skipless.features import check_input_size, check_layers, extract
from dino_skipless.fileio import markdown_table, new_run_id, write_json, write_report
from dino_skipless.models import build_model, load_backbone
from dino_skipless.outdir import check_report_owner

from .feature_cache import build_cache
from .probe_lib import LinProbeConfig, default_layers, probe_from_cache

STAGE = "eval.linprobe"  # the stage that writes these results (dino_skipless.outdir)
DATASETS = ("voc", "ade20k", "cocostuff", "cocostuff27", "synthetic")
SUBSET_DATASETS = ("ade20k", "cocostuff", "cocostuff27")  # paper: 3,000 training images
COUNTS = "per_image_counts.npz"
TABLE_HEADERS = ["dataset", "ckpt", "probe", "layers", "best lr", "mIoU", "± s.e.", "pAcc"]


# ------------------------------------------------------------------------------------ datasets


def build_datasets(dataset: str, root, cfg: LinProbeConfig, synthetic: dict | None = None):
    """(train, val, effective train subset). ``synthetic``: synthetic_root kwargs."""
    name = dataset.lower()
    if name == "synthetic":
        kw = dict(synthetic or {})
        root = synthetic_root("voc", cache_dir=root, **kw)
        name = "voc"
    if root is None:
        raise SystemExit(f"--dataset {dataset} needs --root PATH")
    subset = cfg.train_subset if name in SUBSET_DATASETS else cfg.voc_train_subset
    split = cfg.voc_train_split if name == "voc" else "train"
    train = build_segmentation_dataset(
        name, root, split, subset=subset, subset_seed=cfg.subset_seed
    )
    val = build_segmentation_dataset(name, root, "val")
    return train, val, subset, Path(root)


# ------------------------------------------------------------------------------------ pipeline


def resolve_probe_layers(model, cfg: LinProbeConfig, modes) -> dict[str, list[int]]:
    """Blocks of each requested probe, validated against the backbone (fails with the range)."""
    single, multi = default_layers(len(model.blocks))
    out = {}
    if "single" in modes:
        out["single"] = check_layers(model, cfg.layers if cfg.layers else single)
    if "multiscale" in modes:
        out["multiscale"] = check_layers(model, cfg.ms_layers if cfg.ms_layers else multi)
    return out


def validate(model, cfg: LinProbeConfig, modes) -> dict[str, list[int]]:
    """Everything that can be wrong with the backbone/flags, before any work."""
    layers = resolve_probe_layers(model, cfg, modes)
    check_input_size(model, cfg.resolution, cfg.resolution)
    return layers


def probe_backbone(
    model,
    train_ds,
    val_ds,
    cfg: LinProbeConfig,
    modes=("single",),
    device="cpu",
    cache_dir=None,
    key_parts: dict | None = None,
    extractor=extract,
    progress: bool = True,
    on_probe=None,
    data_digest: dict | None = None,
) -> dict:
    """Extract once (union of the probes' blocks), then run each probe from the same cache.

    ``on_probe(partial)``: called after each probe but the last with the run so far (same
    layout as the return value), so a long ``--mode both`` run keeps its finished probe.
    ``data_digest``: ``{"train", "val"}`` of ``split_digests`` (computed when None): part of the
    cache key, and what paired comparisons check. Mask pixels outside the label set are
    counted (``unknown_labels``); above ``cfg.max_unknown_label_fraction`` of a split's pixels
    the run is refused (DatasetError naming the files)."""
    layers = validate(model, cfg, modes)
    union = sorted({la for ls in layers.values() for la in ls})
    device = torch.device(device)
    t0 = time.perf_counter()
    data = data_digest or split_digests(train_ds, val_ds)
    kp = dict(key_parts or {})
    common = dict(
        batch_size=cfg.extract_batch_size,
        num_workers=cfg.num_workers,
        device=device,
        cache_dir=cache_dir,
        extractor=extractor,
        progress=progress,
    )
    tr = build_cache(
        model,
        train_ds,
        union,
        cfg.resolution,
        train=True,
        key_parts={**kp, "split": "train", "data": data["train"]},
        desc="train features",
        **common,
    )
    va = build_cache(
        model,
        val_ds,
        union,
        cfg.resolution,
        train=False,
        key_parts={**kp, "split": "val", "data": data["val"]},
        desc="val features",
        **common,
    )
    unknown = {"train": tr.meta["unknown_labels"], "val": va.meta["unknown_labels"]}
    check_unknown_labels(unknown, cfg.max_unknown_label_fraction, train_ds.name)
    t1 = time.perf_counter()
    stats: dict = {}
    results = {}
    probe_s = {}

    def run_so_far() -> dict:
        return {
            "results": dict(results),
            "timings": {
                "features_s": t1 - t0,
                "probe_s": dict(probe_s),
                "total_s": time.perf_counter() - t0,
            },
            "backbone_passes": {"train": tr.passes, "val": va.passes},
            "n_train": len(tr),
            "n_val": len(va),
            "cached_layers": union,
            "grid": list(tr.grid),
            "val_digest": masks_digest(va.masks),
            "data_digest": data,
            "cache_key": {"train": tr.meta["cache_key"], "val": va.meta["cache_key"]},
            "unknown_labels": unknown,
        }

    for i, (mode, ls) in enumerate(layers.items()):
        tm = time.perf_counter()
        results[mode] = probe_from_cache(
            tr, va, ls, train_ds.num_classes, train_ds.class_names, cfg, device, stats, progress
        )
        probe_s[mode] = time.perf_counter() - tm
        if on_probe is not None and i < len(layers) - 1:
            on_probe(run_so_far())
    return run_so_far()


def split_digests(train_ds, val_ds) -> dict:
    """Content digests of both splits' image and mask files (``dino_skipless.digest``)."""
    return {"train": segmentation_digest(train_ds), "val": segmentation_digest(val_ds)}


def _unknown_summary(split: str, u: dict, dataset: str) -> str:
    files = ", ".join(f"{name} ({n} px)" for name, n in u["files"][:5])
    more = f" and {u['n_files'] - 5} more" if u["n_files"] > 5 else ""
    return (
        f"{u['n_files']} {split} mask(s) of {dataset} hold {u['pixels']:,} pixels "
        f"({100 * u['pixels'] / max(u['total'], 1):.3g} %) of values outside its label set or "
        f"colours outside its palette, read as ignore: {files}{more}"
    )


def check_unknown_labels(unknown: dict, max_fraction: float, dataset: str) -> None:
    """Refuse a split whose masks hold more than ``max_fraction`` of their pixels outside the
    label set: a probe trained or scored on them measures nothing (an all-77 training mask
    moved a VOC mIoU by 5 points without a word)."""
    for split, u in unknown.items():
        if u["pixels"] > max_fraction * u["total"]:
            raise DatasetError(
                _unknown_summary(split, u, dataset)
                + f"; more than max_unknown_label_fraction={max_fraction:g}: fix the masks "
                "(python -m dino_skipless.data.check lists them) or raise "
                "--max-unknown-label-fraction"
            )


def unknown_labels_warning(unknown: dict, dataset: str) -> str | None:
    """The run's one warning about mask pixels outside the label set (None when there are
    none)."""
    parts = [_unknown_summary(s, u, dataset) for s, u in unknown.items() if u["pixels"]]
    return "warning: " + "; ".join(parts) if parts else None


def masks_digest(masks) -> str:
    """Fingerprint of the validation targets (order included): paired comparisons need both
    runs to have scored the same images at the same label resolution."""
    h = hashlib.sha1()
    for m in masks:
        m = np.ascontiguousarray(np.asarray(m, dtype=np.uint8))
        h.update(np.asarray(m.shape, dtype=np.int64).tobytes())
        h.update(m.tobytes())
    return h.hexdigest()


def save_counts(folder: Path, run: dict, run_id: str) -> None:
    """Move the per-image counts out of ``run`` (they are not JSON) into
    ``folder/per_image_counts.npz``: one ``(N_val, C, 3)`` array per probe, plus the digest and
    the run id that ``results.json`` carries too. Without counts (``--bootstrap 0``) an older
    run's file is removed, so the folder never pairs this run's results with another's counts."""
    arrays = {
        mode: np.asarray(r.pop("per_image_counts"), dtype=np.int64)
        for mode, r in run["results"].items()
        if "per_image_counts" in r
    }
    path = folder / COUNTS
    if not arrays:
        path.unlink(missing_ok=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".per_image_counts.tmp.npz"
    np.savez_compressed(
        tmp, val_digest=np.array(run["val_digest"]), run_id=np.array(run_id), **arrays
    )
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ outputs


def assemble(run: dict, modes, meta: dict) -> dict:
    """results.json layout (see module docstring)."""
    res = run["results"]
    top = res["single"] if "single" in res else res["multiscale"]
    out = {"probe": "single" if "single" in res else "multiscale", **top}
    if "single" in res and "multiscale" in res:
        out["multiscale"] = res["multiscale"]
    out.update(meta)
    out.update({k: v for k, v in run.items() if k != "results"})
    return out


def table_rows(dataset: str, label: str, run: dict) -> list[list]:
    rows = []
    for mode, r in run["results"].items():
        layers = ",".join(str(x) for x in r["layers"])
        se = r.get("miou_se", float("nan"))
        rows.append([dataset, label, mode, layers, r["best_lr"], r["miou"], se, r["pacc"]])
    return rows


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "ckpt"


# ------------------------------------------------------------------------------------ stage


def backbone_entries(ckpt: str | None, random_init: str | None, sweep: list[str] | None):
    """``--ckpt``, ``--random-init`` and ``--sweep-ckpts`` as one list of entries for
    ``load_backbones`` (``random:VARIANT`` for a random init)."""
    entries = list(sweep or [])
    if ckpt:
        entries.insert(0, ckpt)
    if random_init:
        entries.insert(0, f"random:{random_init}")
    if not entries:
        raise SystemExit("give a backbone: --ckpt PATH, --random-init VARIANT or --sweep-ckpts ...")
    return entries


def load_backbones(
    entries: list[str],
    arch: str,
    seed: int = 0,
    patch_size: int = 16,
    depth: int | None = None,
    trust: bool = False,
    ckpt_variant: str | None = None,
) -> list[tuple]:
    """[(model, spec, label, checkpoint description)]; ``random:VARIANT`` entries are random
    inits of ``arch`` (``seed``, ``patch_size``, ``depth``); ``ckpt_variant``: the variant of
    plain state dicts (``--ckpt-variant``)."""
    out = []
    for e in entries:
        if e.startswith("random:"):
            variant = e.split(":", 1)[1]
            model = build_model(arch, variant, seed=seed, patch_size=patch_size, depth=depth).eval()
            desc = {"random_init": variant, "arch": arch, "seed": seed}
            out.append((model, model.spec, f"random-{variant}", desc))
        else:
            model, spec = load_backbone(e, trust=trust, variant=ckpt_variant)
            # the file actually read (a folder's backbone.pt) and the sha256 of its bytes: the
            # cache key (a stat of the path named missed a checkpoint overwritten in place)
            desc = dict(model.checkpoint_source)
            out.append((model, spec, label_for(e, spec), desc))
    labels = distinct_labels(entries, [b[2] for b in out], [b[1].variant for b in out])
    return [(m, spec, label, desc) for (m, spec, _, desc), label in zip(out, labels)]


def distinct_labels(entries: list[str], labels: list[str], variants: list[str]) -> list[str]:
    """Labels that tell every entry apart, so that ``--sweep-ckpts a/run b/run`` writes two
    folders and two table rows: entries sharing a label are named by as many trailing path
    parts as tell them apart (``a/run (skipless_init)``, ``b/run (skipless_init)``); what no
    path tells apart (``random:skip`` twice) is numbered."""
    out = list(labels)
    for label in set(labels):
        same = [i for i, x in enumerate(labels) if x == label]
        if len(same) < 2:
            continue
        parts = [_path_parts(entries[i]) for i in same]
        for n in range(2, max(len(p) for p in parts) + 1):
            names = ["/".join(p[-n:]) for p in parts]
            if len(set(names)) == len(names):
                for i, name in zip(same, names):
                    out[i] = f"{name} ({variants[i]})"
                break
    for i in range(len(out)):  # still equal (same entry twice, random:VARIANT twice)
        k = sum(x == out[i] for x in out[:i])
        if k:
            out[i] = f"{out[i]} #{k + 1}"
    return out


def _path_parts(entry: str) -> tuple[str, ...]:
    p = Path(entry)
    if p.name in ("backbone.pt", "backbone.safetensors", "checkpoint.pt"):
        p = p.parent
    return p.parts


def sweep_folders(out_dir: Path, labels: list[str]) -> list[Path]:
    """``OUT/<label>/`` per backbone of a sweep, one folder each: two labels that differ can
    still make the same file name (``a b``, ``a_b``), which then get a number."""
    names: list[str] = []
    for label in labels:
        name, k = safe_name(label), 1
        while name in names:
            k += 1
            name = f"{safe_name(label)}_{k}"
        names.append(name)
    return [out_dir / n for n in names]


def synthetic_cpu_resolution(cfg: LinProbeConfig, patch: int, scene_size: int) -> LinProbeConfig:
    """The scenes' side rounded up to the patch size: 448 px upsamples the small synthetic
    scenes ~12x in pixels, minutes per epoch on a CPU."""
    side = -(-scene_size // patch) * patch
    print(
        f"--dataset synthetic on CPU: --resolution {side} (the scenes' side; the published "
        f"{LinProbeConfig().resolution} is for real datasets: pass --resolution to choose)",
        file=sys.stderr,
    )
    return replace(cfg, resolution=side)


def validate_all(backbones, cfg: LinProbeConfig, modes) -> None:
    """Fail fast: every backbone's layers and patch size checked before any data is read."""
    for model, _, label, _ in backbones:
        try:
            validate(model, cfg, modes)
        except ValueError as e:
            raise SystemExit(f"{label}: {e}") from None


def run_linprobe(
    backbones,
    train_ds,
    val_ds,
    cfg: LinProbeConfig,
    modes,
    device,
    out_dir,
    *,
    dataset: str,
    root,
    subset,
    command: str,
    cache_dir=None,
    progress: bool = True,
) -> str:
    """Probe every backbone; writes ``results.{json,md}`` (+ counts) per backbone, in
    ``out_dir/<label>/`` when there are several, and then ``sweep.{json,md}``. Returns the
    joint table."""
    out_dir = Path(out_dir)
    sweep = len(backbones) > 1
    folders = sweep_folders(out_dir, [b[2] for b in backbones]) if sweep else [out_dir]
    for folder in folders:  # before any work: no other stage's results get replaced
        check_report_owner(folder / "results.json", STAGE)
    rows, summaries = [], []
    data = split_digests(train_ds, val_ds)  # once for every backbone
    warned = False
    for (model, spec, label, desc), folder in zip(backbones, folders):
        # content, not paths: the weights' sha256 (a random init: its recipe) and the spec, the
        # data's digests (added per split by probe_backbone), and what selects the samples
        key = {
            "ckpt": {k: v for k, v in desc.items() if k != "path"},
            "spec": spec.to_dict(),
            "dataset": dataset,
            "subset": subset,
            "subset_seed": cfg.subset_seed,
            "voc_split": cfg.voc_train_split,
        }
        run_id = new_run_id()
        meta = {
            "stage": STAGE,
            "dataset": dataset,
            "root": str(root),
            "num_classes": train_ds.num_classes,
            "label": label,
            "checkpoint": desc,
            "backbone": spec.to_dict(),
            "config": cfg.to_dict(),
            "modes": list(modes),
            "device": str(device),
            "command": command,
        }

        def write_partial(partial, folder=folder, meta=meta, run_id=run_id):
            # the finished single-block probe survives an interrupted multiscale one
            pending = [m for m in modes if m not in partial["results"]]
            partial = {**partial, "results": {k: dict(v) for k, v in partial["results"].items()}}
            save_counts(folder, partial, run_id)
            res = assemble(partial, modes, {"run_id": run_id, "pending": pending, **meta})
            write_json(folder / "results.json", res)
            print(
                f"wrote {folder / 'results.json'} ({', '.join(pending)} pending)", file=sys.stderr
            )

        run = probe_backbone(
            model,
            train_ds,
            val_ds,
            cfg,
            modes,
            device,
            cache_dir,
            key,
            progress=progress,
            on_probe=write_partial,
            data_digest=data,
        )
        warning = unknown_labels_warning(run["unknown_labels"], train_ds.name)
        if warning and not warned:  # the same data for every backbone: said once
            print(warning, file=sys.stderr)
            warned = True
        save_counts(folder, run, run_id)
        result = assemble(run, modes, {"run_id": run_id, **meta})
        r = table_rows(dataset, label, run)
        rows += r
        write_report(folder / "results", result, markdown_table(TABLE_HEADERS, r) + "\n")
        summaries.append(result)
    table = markdown_table(TABLE_HEADERS, rows)
    if sweep:
        write_report(
            out_dir / "sweep",
            {
                "stage": STAGE,
                "rows": [dict(zip(TABLE_HEADERS, r)) for r in rows],
                "runs": summaries,
                "folders": {s["label"]: f.name for s, f in zip(summaries, folders)},
            },
            table + "\n",
        )
    return table
