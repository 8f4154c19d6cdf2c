"""Benchmark the loader: CPU cost per image of the official multi-crop path vs the device path.

At the paper's crops (2x224 + 8x96, ``AugConfig()``), on real-size JPEGs (500x375 synthetic
scenes written to a temporary folder unless ``--images DIR`` is given), one process, one torch
thread, CPU time (``time.process_time``, so other load on the machine does not count):

* official: PIL decode + ``MultiCropAugmentation`` (what a loader worker does with
  ``data.augment_on: cpu``) + the default collate's stacking;
* device, CPU part: decode + parameter sampling (``SeededDecode``) + ``collate_decoded``
  (what a worker does with ``data.augment_on: device``);
* device part: ``device_multicrop`` on ``--device`` per batch (wall time, synchronised).

"cores per GPU" = CPU ms per image x 3,000 images/s (one H100-class GPU at 40 % MFU on a DINO
ViT-S/16 step); "device share" = the fraction of each device second that the augmentation itself
takes at 3,000 images/s.

    python scripts/bench_loader.py                       # CPU as the device
    python scripts/bench_loader.py --device cuda --json bench_loader.json
    python scripts/bench_loader.py --size 1000x750 --draft 256   # effect of JPEG draft decode
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_skipless.data import ImageFolderDataset  # noqa: E402
from dino_skipless.data.files import load_rgb  # noqa: E402
from dino_skipless.data.scenes import render_scene  # noqa: E402
from dino_skipless.dino import AugConfig, MultiCropAugmentation  # noqa: E402
from dino_skipless.dino.augment_device import (  # noqa: E402
    SeededDecode,
    collate_decoded,
    device_multicrop,
)
from dino_skipless.dino.sampling import SeededMultiCrop  # noqa: E402
from dino_skipless.fileio import markdown_table  # noqa: E402

TARGET_IMG_S = 3000.0


def write_jpegs(root: Path, n: int, width: int, height: int) -> Path:
    folder = root / "scenes"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = render_scene(rng, height, width).image
        Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def pick_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"bench_loader: --device {name} asked for but CUDA is not available here "
            "(torch.cuda.is_available() is False); use --device cpu"
        )
    return device


def cpu_ms(fn, batches: list[list[int]]) -> float:
    """CPU ms per image of ``fn(batch_indices)`` over all batches."""
    t0 = time.process_time()
    for b in batches:
        fn(b)
    return (time.process_time() - t0) * 1e3 / sum(len(b) for b in batches)


def device_ms(batch: dict, cfg: AugConfig, device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    device_multicrop(batch, cfg, device)  # warm-up (allocator, kernels)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        device_multicrop(batch, cfg, device)
    sync()
    return (time.perf_counter() - t0) * 1e3 / repeats


def crop_mae(a: dict, b: dict, cfg: AugConfig, device: torch.device) -> float:
    """Mean |difference| in 1/255 units between the crops of two decodes of the same batch."""
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
    x, y = device_multicrop(a, cfg, device), device_multicrop(b, cfg, device)
    return float(torch.stack([((u - v) * std).abs().mean() for u, v in zip(x, y)]).mean() * 255)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="where the device part runs (cpu, cuda)")
    ap.add_argument("--images", help="folder of images (default: synthetic 500x375 JPEGs)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--n", type=int, default=64, help="images timed per path")
    ap.add_argument("--batch", type=int, default=64, help="device batch size")
    ap.add_argument("--size", default="500x375", help="synthetic JPEG size WxH")
    ap.add_argument("--draft", type=int, default=0, help="also time data.decode_draft=N")
    ap.add_argument("--repeats", type=int, default=5, help="device-part repeats")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    torch.set_num_threads(1)  # figures per core

    cfg = AugConfig()  # the paper's crops: 2 x 224 + 8 x 96
    crops = f"2x{cfg.global_size}+{cfg.n_local}x{cfg.local_size}"
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            root = Path(args.images)
        else:
            w, h = (int(v) for v in args.size.lower().split("x"))
            root = write_jpegs(Path(tmp), args.n, w, h)
        base = ImageFolderDataset(root)
        n = min(args.n, len(base))
        idx = list(range(n))
        batches = [idx[i : i + args.batch] for i in range(0, n, args.batch)]

        official = SeededMultiCrop(base, MultiCropAugmentation(cfg), seed=0)

        def run_official(b):
            items = [official[(0, i)] for i in b]
            return [torch.stack(v) for v in zip(*items)]  # the default collate

        decode = SeededDecode(base, cfg, seed=0)
        ms_official = cpu_ms(run_official, batches)
        ms_device_cpu = cpu_ms(lambda b: collate_decoded([decode[(0, i)] for i in b]), batches)
        ms_decode = cpu_ms(lambda b: [load_rgb(base.image_path(i)) for i in b], batches)
        first = collate_decoded([decode[(0, i)] for i in batches[0]])
        ms_batch = device_ms(first, cfg, device, args.repeats)
        b = len(batches[0])
        draft_row = None
        if args.draft:
            drafted = SeededDecode(base, cfg, seed=0, draft=args.draft)
            ms_draft = cpu_ms(lambda bb: collate_decoded([drafted[(0, i)] for i in bb]), batches)
            d_first = collate_decoded([drafted[(0, i)] for i in batches[0]])
            ms_d_batch = device_ms(d_first, cfg, device, args.repeats)
            draft_row = (ms_draft, ms_d_batch, crop_mae(first, d_first, cfg, device))

    def row(name, ms, batch_ms=None, note=""):
        share = "" if batch_ms is None else f"{batch_ms / b * TARGET_IMG_S / 1e3:.2f}"
        return [
            name,
            ms,
            1e3 / ms,
            ms * TARGET_IMG_S / 1e3,
            "" if batch_ms is None else batch_ms,
            share,
            note,
        ]

    rows = [
        row("official (PIL multi-crop)", ms_official),
        row(
            "device: CPU part",
            ms_device_cpu,
            ms_batch,
            f"{ms_official / ms_device_cpu:.1f}x less CPU",
        ),
        row("JPEG decode alone", ms_decode),
    ]
    if draft_row:
        ms_draft, ms_d_batch, mae = draft_row
        rows.append(
            row(
                f"device, decode_draft={args.draft}",
                ms_draft,
                ms_d_batch,
                f"crop MAE {mae:.2f}/255",
            )
        )
    headers = [
        "path",
        "CPU ms/image",
        "images/s per core",
        "cores per GPU @3000 img/s",
        f"{device.type} ms/batch of {b}",
        "device share @3000 img/s",
        "",
    ]
    print(
        f"{n} images from {root if args.images else f'synthetic {args.size} JPEGs'}, crops {crops}"
    )
    print(markdown_table(headers, rows))
    result = {
        "official": {"cpu_ms_per_image": ms_official},
        "device": {"cpu_ms_per_image": ms_device_cpu, "device_ms_per_batch": ms_batch},
        "crops": crops,
        "cores_per_gpu_at_3000": {
            "official": ms_official * TARGET_IMG_S / 1e3,
            "device": ms_device_cpu * TARGET_IMG_S / 1e3,
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
