"""Benchmark the loader: CPU cost per image of the official multi-crop path vs the device path,
and what the device path costs per batch.

At the paper's crops (2x224 + 8x96, ``AugConfig()``), on real-size JPEGs (500x375 synthetic
scenes written to a temporary folder unless ``--images DIR`` is given), one process, one torch
thread, CPU time (``time.process_time``, so other load on the machine does not count):

* official: PIL decode + ``MultiCropAugmentation`` (what a loader worker does with
  ``data.augment_on: cpu``) + the default collate's stacking;
* device, CPU part: decode + parameter sampling (``SeededDecode``) + ``collate_decoded`` (the
  plan, the canvas): what a worker does with ``data.augment_on: device``; with
  ``data.decode_on: device`` the worker only reads the file and its header;
* device part: ``device_multicrop`` on ``--device`` per batch (CPU time on a CPU, synchronised
  wall time on CUDA).

"cores per GPU" = CPU ms per image x 3,000 images/s (one H100-class GPU at 40 % MFU on a DINO
ViT-S/16 step); "device share" = the fraction of each device second that the augmentation itself
takes at 3,000 images/s.

Outliers (``--big``, on by default): the device part's peak memory and time at batch ``--batch``
with and without one 1500 x 1125 image among the 500 x 375 ones, with and without
``data.decode_max_side``. Peak memory on a CPU is the forked child's peak resident set minus its
size before the call (the peak reset at the fork, every tensor mmapped so that a freed one leaves
the resident set); on CUDA ``torch.cuda.max_memory_allocated``.

Launches (``--ops``, on by default): the aten ops one batch of augmentation dispatches
(top-level, as the profiler lists them; independent of device and sizes, but one more canvas
adds its resampling), on one canvas and on two (an outlier added), next to the ViT-S/16 student
forward on the same crops.

    python scripts/bench_loader.py                       # CPU as the device
    python scripts/bench_loader.py --device cuda --json bench_loader.json
    python scripts/bench_loader.py --size 1000x750 --draft 256 --max-side 512
"""

from __future__ import annotations

import argparse
import json
import os
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
    sample_params,
)
from dino_skipless.dino.opcount import count_aten_ops  # noqa: E402
from dino_skipless.dino.sampling import SeededMultiCrop  # noqa: E402
from dino_skipless.fileio import markdown_table  # noqa: E402

TARGET_IMG_S = 3000.0
BIG = (1500, 1125)


def write_jpegs(root: Path, n: int, width: int, height: int, big: int = 0) -> Path:
    """``n`` scenes of ``width x height`` (every 4th one portrait, as ImageNet's mix), the first
    ``big`` of them 1500 x 1125 instead."""
    folder = root / "scenes"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = BIG if i < big else ((height, width) if i % 4 == 3 else (width, height))
        img = render_scene(rng, h, w).image
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_ms(batch: dict, cfg: AugConfig, device: torch.device, repeats: int) -> float:
    """ms per batch of the device part: CPU time on a CPU (load-independent), wall on CUDA."""
    device_multicrop(batch, cfg, device)  # warm-up (allocator, kernels)
    _sync(device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    t0 = clock()
    for _ in range(repeats):
        device_multicrop(batch, cfg, device)
    _sync(device)
    return (clock() - t0) * 1e3 / repeats


def _status_gib(key: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, GiB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    return kib / 2**20


def _reset_peak_rss() -> None:
    """A forked child inherits its parent's peak resident set: start it at the current one
    (Linux >= 4.0; elsewhere the peak may include the parent's, and says so)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        print(f"warning: cannot reset the peak resident set ({e}); peaks may be too high")


def _mmap_every_tensor() -> None:
    """glibc: serve every allocation over 64 KiB by mmap (a fixed threshold, so not the
    dynamic one that earlier frees raised), so freed tensors leave the resident set and its
    peak is the live tensors' peak, not the heap's fragmentation."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: the plain resident set
        pass


def peak_gib_and_ms(batch: dict, cfg: AugConfig, device: torch.device) -> tuple[float, float]:
    """(peak GiB above the start, ms) of one ``device_multicrop`` call after a warm-up."""
    if device.type == "cuda":
        device_multicrop(batch, cfg, device)
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        device_multicrop(batch, cfg, device)
        _sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        return (torch.cuda.max_memory_allocated(device) - base) / 2**30, ms
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child's peak resident set is this call's alone
        try:
            _mmap_every_tensor()
            _reset_peak_rss()
            start = _status_gib("VmRSS")
            t0 = time.process_time()
            device_multicrop(batch, cfg, device)
            ms = (time.process_time() - t0) * 1e3
            os.write(write, json.dumps([_status_gib("VmHWM") - start, ms]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        out = json.loads(f.read())
    os.waitpid(pid, 0)
    return out[0], out[1]


def crop_mae(a: dict, b: dict, cfg: AugConfig, device: torch.device) -> float:
    """Mean |difference| in 1/255 units between the crops of two decodes of the same batch."""
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
    x, y = device_multicrop(a, cfg, device), device_multicrop(b, cfg, device)
    return float(torch.stack([((u - v) * std).abs().mean() for u, v in zip(x, y)]).mean() * 255)


def outliers(args, cfg: AugConfig, device: torch.device, tmp: Path) -> list[list]:
    """Peak memory and time of the device part with and without one 1500 x 1125 image."""
    w, h = (int(v) for v in args.size.lower().split("x"))
    plain = ImageFolderDataset(write_jpegs(tmp / "plain", args.batch, w, h))
    big = ImageFolderDataset(write_jpegs(tmp / "big", args.batch, w, h, big=1))
    runs = [("none", plain, 0), ("one 1500x1125", big, 0)]
    runs += [(f"one 1500x1125, decode_max_side={args.cap}", big, args.cap)] if args.cap else []
    rows, base = [], None
    for name, ds, cap in runs:
        decode = SeededDecode(ds, cfg, seed=0, max_side=cap)
        batch = collate_decoded([decode[(0, i)] for i in range(len(ds))], cfg)
        gib, ms = peak_gib_and_ms(batch, cfg, device)
        canvas = " + ".join(
            f"{c.shape[0]}x{c.shape[1]}x{c.shape[2]}" for c in batch["canvases"]
        )  # B x H x W of each canvas
        base = base or (gib, ms)
        rows.append([name, canvas, gib, ms, f"{gib / base[0]:.2f}x", f"{ms / base[1]:.2f}x"])
    return rows


def op_counts(cfg: AugConfig, items: list, device: torch.device) -> tuple[int, int, int]:
    """(augmentation on one canvas, on two canvases (one 1500 x 1125 outlier added), ViT-S/16
    student forward) top-level aten ops for one batch (the count depends on the number of
    canvases, not on the batch or image sizes)."""
    from dino_skipless.dino.config import build_config
    from dino_skipless.dino.trainer import build_student_teacher

    batch = collate_decoded(items, cfg)
    crops = device_multicrop(batch, cfg, device)
    # the residual-free variants' forward: the fewest ops (no residual adds)
    student, _ = build_student_teacher(build_config(None, {"model.variant": "skipless"}))
    student.to(device)
    with torch.no_grad():
        model = count_aten_ops(lambda: student(crops))[0]
    aug = count_aten_ops(lambda: device_multicrop(batch, cfg, device))[0]
    w, h = BIG
    big = (torch.zeros(h, w, 3, dtype=torch.uint8), sample_params(cfg, h, w), items[0][2])
    two = collate_decoded([*items, big], cfg)
    assert len(two["canvases"]) == 2, [c.shape for c in two["canvases"]]
    aug_two = count_aten_ops(lambda: device_multicrop(two, cfg, device))[0]
    return aug, aug_two, model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="where the device part runs (cpu, cuda)")
    ap.add_argument("--images", help="folder of images (default: synthetic 500x375 JPEGs)")
    ap.add_argument("--json", help="write the figures to this JSON file")
    ap.add_argument("--n", type=int, default=64, help="images timed per path")
    ap.add_argument("--batch", type=int, default=64, help="device batch size")
    ap.add_argument("--size", default="500x375", help="synthetic JPEG size WxH")
    ap.add_argument("--draft", type=int, default=0, help="also time data.decode_draft=N")
    ap.add_argument("--max-side", type=int, default=0, help="also time data.decode_max_side=N")
    ap.add_argument("--cap", type=int, default=512, help="decode_max_side of the outlier rows")
    ap.add_argument("--repeats", type=int, default=3, help="device-part repeats")
    ap.add_argument("--no-big", dest="big", action="store_false", help="skip the outlier rows")
    ap.add_argument("--no-ops", dest="ops", action="store_false", help="skip the op counts")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    torch.set_num_threads(1)  # figures per core

    cfg = AugConfig()  # the paper's crops: 2 x 224 + 8 x 96
    crops = f"2x{cfg.global_size}+{cfg.n_local}x{cfg.local_size}"
    result: dict = {"crops": crops, "device": str(device)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            root = Path(args.images)
        else:
            w, h = (int(v) for v in args.size.lower().split("x"))
            root = write_jpegs(Path(tmp) / "timed", args.n, w, h)
        base = ImageFolderDataset(root)
        n = min(args.n, len(base))
        idx = list(range(n))
        batches = [idx[i : i + args.batch] for i in range(0, n, args.batch)]

        official = SeededMultiCrop(base, MultiCropAugmentation(cfg), seed=0)

        def run_official(b):
            items = [official[(0, i)] for i in b]
            return [torch.stack(v) for v in zip(*items)]  # the default collate

        def worker(ds):
            return lambda b: collate_decoded([ds[(0, i)] for i in b], cfg)

        decode = SeededDecode(base, cfg, seed=0)
        encoded = SeededDecode(base, cfg, seed=0, encoded=True)
        ms_official = cpu_ms(run_official, batches)
        ms_device_cpu = cpu_ms(worker(decode), batches)
        ms_encoded_cpu = cpu_ms(worker(encoded), batches)
        ms_decode = cpu_ms(lambda b: [load_rgb(base.image_path(i)) for i in b], batches)
        first = collate_decoded([decode[(0, i)] for i in batches[0]], cfg)
        ms_batch = device_ms(first, cfg, device, args.repeats)
        b = len(batches[0])
        extra = []
        for name, ds in (
            (f"decode_draft={args.draft}", SeededDecode(base, cfg, 0, draft=args.draft)),
            (
                f"decode_max_side={args.max_side}",
                SeededDecode(base, cfg, 0, max_side=args.max_side),
            ),
        ):
            if name.endswith("=0"):
                continue
            other = collate_decoded([ds[(0, i)] for i in batches[0]], cfg)
            extra.append(
                (name, cpu_ms(worker(ds), batches), device_ms(other, cfg, device, args.repeats))
                + (crop_mae(first, other, cfg, device),)
            )
        big_rows = outliers(args, cfg, device, Path(tmp)) if args.big else []
        ops = op_counts(cfg, [decode[(0, i)] for i in (0, 3)], device) if args.ops else None

    def row(name, ms, batch_ms=None, note=""):
        share = "" if batch_ms is None else f"{batch_ms / b * TARGET_IMG_S / 1e3:.2f}"
        return [name, ms, 1e3 / ms, ms * TARGET_IMG_S / 1e3, batch_ms or "", share, note]

    rows = [
        row("official (PIL multi-crop)", ms_official),
        row(
            "device: CPU part",
            ms_device_cpu,
            ms_batch,
            f"{ms_official / ms_device_cpu:.1f}x less CPU",
        ),
        row(
            "device, decode_on=device: CPU part",
            ms_encoded_cpu,
            None,
            f"{ms_official / ms_encoded_cpu:.1f}x less CPU (+ the device's decode)",
        ),
        row("JPEG decode alone", ms_decode),
    ]
    for name, ms, d_ms, mae in extra:
        rows.append(row(f"device, {name}", ms, d_ms, f"crop MAE {mae:.2f}/255"))
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
    result |= {
        "official": {"cpu_ms_per_image": ms_official},
        "device": {"cpu_ms_per_image": ms_device_cpu, "device_ms_per_batch": ms_batch},
        "device_decode_on_device": {"cpu_ms_per_image": ms_encoded_cpu},
        "jpeg_decode_ms_per_image": ms_decode,
        "cores_per_gpu_at_3000": {
            "official": ms_official * TARGET_IMG_S / 1e3,
            "device": ms_device_cpu * TARGET_IMG_S / 1e3,
            "device_decode_on_device": ms_encoded_cpu * TARGET_IMG_S / 1e3,
        },
        "extra": [dict(zip(("name", "cpu_ms", "device_ms", "crop_mae"), e)) for e in extra],
    }
    if big_rows:
        print(f"\nDevice part, batch {args.batch} of {args.size} JPEGs, one replaced by 1500x1125:")
        print(
            markdown_table(
                ["outlier", "canvas HxW", "peak GiB", f"{device.type} ms", "memory", "time"],
                big_rows,
            )
        )
        result["outliers"] = [
            dict(zip(("outlier", "canvas", "peak_gib", "ms"), r[:4])) for r in big_rows
        ]
    if ops:
        print(
            f"\naten ops per batch (top-level): augmentation {ops[0]} (one canvas), {ops[1]} (two"
            f" canvases: an outlier); ViT-S/16 student forward {ops[2]}"
        )
        result["aten_ops"] = dict(
            zip(("augmentation", "augmentation_2_canvases", "student_forward"), ops)
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
