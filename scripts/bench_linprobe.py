"""Linear-probe speed: cached features + all lrs at once vs the naive loop.

Naive = what a straightforward script does: for every lr, for every epoch, load each image and
run the backbone again, train that lr's probe; then one more pass over val per lr. Cached = our
pipeline: the backbone runs once per image (train + val), all lrs train in one pass over the
fp16 cache. Both train the same probes (same seed, init and batch order; standardisation off
so that the naive loop needs no statistics pass), so their mIoU agree up to fp16 rounding.

    python scripts/bench_linprobe.py                      # CPU, synthetic VOC, vit_mini
    python scripts/bench_linprobe.py --device cuda --arch vit_small --patch-size 16 \
        --resolution 448 --n 200 --size 256
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_skipless.cli import resolve_device  # noqa: E402
from dino_skipless.data import VOCSegmentation, synthetic_root  # noqa: E402
from dino_skipless.features import extract  # noqa: E402
from dino_skipless.fileio import markdown_table  # noqa: E402
from dino_skipless.models import build_model  # noqa: E402
from eval.feature_cache import ResizedSegmentation  # noqa: E402
from eval.linprobe_lib import probe_backbone  # noqa: E402
from eval.metrics import mean_iou  # noqa: E402
from eval.probe_lib import LinProbeConfig, evaluate_probes, train_probes  # noqa: E402


class Counter:
    def __init__(self):
        self.images = 0

    def __call__(self, model, images, layers, **kw):
        self.images += images.shape[0]
        return extract(model, images, layers, **kw)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive(model, train_ds, val_ds, cfg, layer, device, counter):
    """Backbone forward every epoch for every lr (images reloaded each time)."""
    model = model.to(device).eval()
    tr = ResizedSegmentation(train_ds, cfg.resolution, resize_mask=True)
    va = ResizedSegmentation(val_ds, cfg.resolution, resize_mask=False)
    tr_masks = torch.stack([tr[i][1] for i in range(len(tr))])
    va_masks = [va[i][1] for i in range(len(va))]

    def feats(ds):
        def f(idx):
            x = torch.stack([ds[int(i)][0] for i in idx]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return counter(model, x, [layer], kind="tokens", norm=True).patch_grid(layer)

        return f

    dim = model.embed_dim
    out = {}
    for lr in cfg.lrs:
        p = train_probes(
            feats(tr), tr_masks, train_ds.num_classes, dim, [lr], cfg, device, progress=False
        )
        conf = evaluate_probes(
            p,
            feats(va),
            va_masks,
            train_ds.num_classes,
            device,
            batch_size=cfg.batch_size,
            progress=False,
        )
        out[lr] = mean_iou(conf[0]) * 100
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="vit_mini")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--n", type=int, default=40, help="synthetic VOC scenes")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    root = synthetic_root("voc", n=args.n, size=args.size, seed=0)
    train_ds, val_ds = VOCSegmentation(root, "train"), VOCSegmentation(root, "val")
    model = build_model(
        args.arch, "skipless_init", seed=0, patch_size=args.patch_size, depth=args.depth
    ).eval()
    layer = len(model.blocks) - 1
    cfg = replace(
        LinProbeConfig(),
        resolution=args.resolution,
        epochs=args.epochs,
        lrs=tuple(args.lrs),
        batch_size=args.batch_size,
        standardize=False,
        layers=(layer,),
        num_workers=0,
        extract_batch_size=args.batch_size,
    )

    c1 = Counter()
    sync(device)
    t = time.perf_counter()
    run = probe_backbone(
        model, train_ds, val_ds, cfg, ("single",), device, extractor=c1, progress=False
    )
    sync(device)
    t_cached = time.perf_counter() - t
    cached = run["results"]["single"]["per_lr"]

    c2 = Counter()
    t = time.perf_counter()
    ref = naive(model, train_ds, val_ds, cfg, layer, device, c2)
    sync(device)
    t_naive = time.perf_counter() - t

    gap = max(abs(cached[repr(float(lr))] - ref[lr]) for lr in cfg.lrs)
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
        f", {torch.get_num_threads()} threads), {args.arch} depth {len(model.blocks)} "
        f"/{args.patch_size} at {args.resolution}px, train {len(train_ds)} / val {len(val_ds)} "
        f"images, {len(cfg.lrs)} lrs x {cfg.epochs} epochs\n"
    )
    rows = [
        ["naive loop", c2.images, t_naive, 1.0, max(ref.values())],
        ["cached, all lrs at once", c1.images, t_cached, t_naive / t_cached, max(cached.values())],
    ]
    print(
        markdown_table(
            ["method", "backbone passes (images)", "wall s", "speedup", "best mIoU"], rows
        )
    )
    print(f"\nmax |mIoU cached - naive| over lrs: {gap:.3f} points (fp16 cache)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
