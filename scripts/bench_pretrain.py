"""Benchmark DINO pretraining: the step alone and the whole loop, img/s, MFU, peak memory.

Step: teacher forward on the 2 global crops, student forward + backward on all crops, DINO loss,
per-parameter gradient clipping, optimizer step, EMA teacher update (what
``dino_skipless.dino.trainer`` does per iteration, minus data loading), on distinct random crops
of the config's sizes and counts (``--config``, default the paper's ViT-S/16 run: 2 x 224 +
8 x 96). For each variant x optimizer it times our step ("ours": ``--precision`` autocast (bf16
by default, on a CPU too, where the trainer itself stays fp32), timm's fused SDPA attention,
fused AdamW on CUDA, foreach clipping/EMA, the head in fp32, optional ``torch.compile``) and,
with ``--official``, the step the way the official DINO code runs it in the same process
("official": fp16 autocast + GradScaler, the head under autocast too, unfused attention
(``attn.fused_attn = False``), eager, AdamW with ``foreach=False``, per-parameter Python loops
for clipping and EMA), so the speed-up is a ratio measured side by side on the same machine.

Whole loop (``--loop``): the trainer itself (``train`` with ``run.max_steps``) on synthetic JPEGs
of ImageNet's usual sizes (500 x 375, every 4th one portrait; ``--images DIR`` for real ones):
the DataLoader and its workers (decode, parameter draws, plan), the batched augmentation on the
device (``data.augment_on: device``), the step and the EMA, with logging every ``--steps`` steps.
It runs ``--steps`` warm-up steps (workers starting, compilation) and reports the img/s of the
next ``--steps``, as the trainer logs them. This is the number a user gets.

MFU = model FLOPs per image (counted once with ``torch.utils.flop_counter.FlopCounterMode`` on
our step; the same count is used for every mode) x img/s / peak FLOP/s of the device (known GPUs
in ``PEAK_TFLOPS``, else ``--peak-tflops``).

    python scripts/bench_pretrain.py --device cuda --official --loop --compile
    python scripts/bench_pretrain.py --device cuda --batch 128 --loop --peak-tflops 989
    python scripts/bench_pretrain.py --device cpu --arch vit_mini --depth 2 --batch 8 \\
        --global-size 64 --local-size 32 --n-local 2 --out-dim 1024 --steps 3 --warmup 1 --official
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_skipless.dino import DINOLoss, ema_update_  # noqa: E402
from dino_skipless.dino.config import build_config  # noqa: E402
from dino_skipless.dino.runlog import memory_gb, read_jsonl  # noqa: E402
from dino_skipless.dino.schedules import clip_gradients  # noqa: E402
from dino_skipless.dino.trainer import (  # noqa: E402
    _teacher_forward,
    build_student_teacher,
    train,
)
from dino_skipless.fileio import markdown_table  # noqa: E402
from dino_skipless.optim import AdamWConfig, build_optimizer, get_param_groups  # noqa: E402

# Dense bf16/fp16 tensor-core peaks (vendor data sheets), TFLOP/s.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
    "V100": 125.0,
}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


# --- the official DINO code's per-parameter loops (facebookresearch/dino utils.py) ----------


def official_clip_gradients(model: torch.nn.Module, clip: float) -> list[float]:
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


@torch.no_grad()
def official_ema(teacher: torch.nn.Module, student: torch.nn.Module, m: float) -> None:
    for param_q, param_k in zip(student.parameters(), teacher.parameters()):
        param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


# --- one configuration ------------------------------------------------------------------------


def make_crops(cfg, batch: int, device: torch.device) -> list[torch.Tensor]:
    """Distinct random crops, one tensor per view, of the config's sizes and counts."""
    g = torch.Generator().manual_seed(0)
    sizes = [cfg.aug.global_size] * 2 + [cfg.aug.local_size] * int(cfg.aug.n_local)
    return [torch.randn(batch, 3, s, s, generator=g).to(device) for s in sizes]


def bench_config(args, variant: str, optimizer: str):
    """``--config`` with the command line's model / crop / head overrides."""
    overrides = {
        "model.arch": args.arch,
        "model.variant": variant,
        "model.patch_size": args.patch_size,
        "model.depth": args.depth,
        "aug.global_size": args.global_size,
        "aug.local_size": args.local_size,
        "aug.n_local": args.n_local,
        "dino.out_dim": args.out_dim,
        "optim.optimizer": optimizer,
    }
    return build_config(args.config, {k: v for k, v in overrides.items() if v is not None})


def build(args, variant: str, optimizer: str, official: bool, device: torch.device):
    cfg = bench_config(args, variant, optimizer)
    student, teacher = build_student_teacher(cfg)
    student.to(device)
    teacher.to(device)
    if official:
        for m in (student, teacher):
            m.head.fp32 = False  # the official head runs under autocast
            for blk in m.backbone.blocks:
                blk.attn.fused_attn = False  # the official ViT computes q k^T, softmax, @ v
        adamw = AdamWConfig(fused=False)
    else:
        adamw = AdamWConfig()  # fused on CUDA
    groups = get_param_groups(student)
    if official and optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=1e-4, foreach=False)
    else:
        opt = build_optimizer(optimizer, groups, lr=1e-4, weight_decay=0.04, adamw=adamw)
    loss_fn = DINOLoss(cfg.dino.out_dim, cfg.n_crops).to(device)
    return cfg, student, teacher, opt, loss_fn


def step_fn(args, student, teacher, opt, loss_fn, official: bool, device: torch.device):
    cuda = device.type == "cuda"
    if official:
        dtype, scaler = torch.float16, (torch.amp.GradScaler("cuda") if cuda else None)
    else:
        dtype, scaler = (torch.bfloat16 if args.precision == "bf16" else torch.float32), None
    # bf16 autocast wherever asked (the trainer itself autocasts on CUDA only: on CPU
    # ``effective_precision`` is fp32); the official fp16 path only on CUDA
    use_autocast = dtype == torch.bfloat16 or (cuda and dtype != torch.float32)
    s_fwd, t_fwd = student, teacher
    if args.compile and not official:  # as the trainer: two graphs, no shared code object
        compile = functools.partial(torch.compile, backend=args.compile_backend)
        s_fwd = compile(student)
        t_fwd = functools.partial(compile(_teacher_forward), teacher)

    def step(crops):
        ctx = torch.autocast(device.type, dtype=dtype) if use_autocast else contextlib.nullcontext()
        with ctx:
            if official:
                t_out = t_fwd(crops[:2])  # official: no no_grad (teacher has requires_grad False)
            else:
                with torch.no_grad():
                    t_out = t_fwd(crops[:2])
            s_out = s_fwd(crops)
            loss = loss_fn(s_out, t_out, 0)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            official_clip_gradients(student, 3.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if official:
                official_clip_gradients(student, 3.0)
            else:
                clip_gradients(student, 3.0)
            opt.step()
        if official:
            official_ema(teacher, student, 0.996)
        else:
            ema_update_(teacher, student, 0.996)
        return loss

    return step


def count_model_flops(student, teacher, loss_fn, crops, dtype, device) -> float | None:
    """FLOPs of teacher fwd + student fwd/bwd + loss (the model's, not the optimizer's)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # torch < 2.1
        return None
    counter = FlopCounterMode(display=False)
    use_autocast = device.type == "cuda" and dtype != torch.float32
    ctx = torch.autocast("cuda", dtype=dtype) if use_autocast else contextlib.nullcontext()
    center = loss_fn.center.clone()
    with counter:
        with ctx:
            with torch.no_grad():
                t_out = teacher(crops[:2])
            loss = loss_fn(student(crops), t_out, 0)
        loss.backward()
    student.zero_grad(set_to_none=True)
    loss_fn.center.copy_(center)
    return float(counter.get_total_flops())


def bench_one(args, variant, optimizer, official, device, flops=None) -> dict:
    torch.manual_seed(0)
    cfg, student, teacher, opt, loss_fn = build(args, variant, optimizer, official, device)
    step = step_fn(args, student, teacher, opt, loss_fn, official, device)
    crops = make_crops(cfg, args.batch, device)
    if flops is None and not official:
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        flops = count_model_flops(student, teacher, loss_fn, crops, dtype, device)
    for _ in range(args.warmup):
        step(crops)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step(crops)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / args.steps
    peak = peak_tflops(device, args.peak_tflops)
    return {
        "variant": variant,
        "optimizer": optimizer,
        "mode": "official" if official else ("ours+compile" if args.compile else "ours"),
        "batch": args.batch,
        "step_ms": dt * 1e3,
        "img_per_s": args.batch / dt,
        "tflops_per_step": flops / 1e12 if flops else None,
        "mfu": (flops / dt / (peak * 1e12)) if (flops and peak) else None,
        "peak_mem_gb": memory_gb(device),
        "loss": float(loss.detach()),
        "_flops": flops,
        "_cfg": cfg,
    }


def write_jpegs(folder: Path, n: int) -> Path:
    """``n`` synthetic scenes of ImageNet's usual size, 500 x 375 (every 4th 375 x 500)."""
    from PIL import Image

    from dino_skipless.data.scenes import render_scene

    sub = folder / "scenes"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (500, 375) if i % 4 == 3 else (375, 500)
        Image.fromarray(render_scene(rng, h, w).image).save(sub / f"{i:05d}.jpg", quality=90)
    return folder


def bench_loop(args, cfg, device: torch.device, flops: float | None, tmp: Path) -> dict:
    """The trainer's own loop for 2 x ``--steps`` steps; img/s of the second window."""
    n_steps = 2 * args.steps
    images = Path(args.images) if args.images else write_jpegs(tmp / "jpegs", args.batch * n_steps)
    overrides = {
        "data.path": str(images),
        "data.batch_size_per_gpu": args.batch,
        "data.augment_on": "device",
        "data.num_workers": args.workers if args.workers is not None else cfg.data.num_workers,
        "run.device": str(device),
        "run.precision": args.precision,
        "run.compile": args.compile,
        "run.compile_backend": args.compile_backend,
        "run.max_steps": n_steps,
        "run.log_every": args.steps,
        "run.out": str(tmp / f"run_{len(list(tmp.glob('run_*')))}"),
        "run.progress": False,
        "run.tensorboard": False,
        "run.saveckp_freq": 0,
        "run.keep_epochs": [],
        "optim.epochs": max(cfg.optim.epochs, 2),
        "optim.warmup_epochs": 1,
    }
    loop_cfg = build_config(None, overrides, base=cfg)
    train(loop_cfg)
    records = read_jsonl(loop_cfg.out_dir() / "log.jsonl")
    timed = [r for r in records if r["step"] == n_steps - 1]
    img_s = timed[0]["img_per_s"] if timed else None
    peak = peak_tflops(device, args.peak_tflops)
    return {
        "loop_img_per_s": img_s,
        "loop_mfu": (flops * img_s / args.batch / (peak * 1e12))
        if (flops and peak and img_s)
        else None,
        "loop_peak_mem_gb": timed[0]["mem_gb"] if timed else None,
        "loop_precision": "fp32" if device.type != "cuda" else args.precision,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config",
        default=str(
            Path(__file__).resolve().parents[1] / "configs/dino_vits16_skipless_init_adamw.yaml"
        ),
        help="the run whose model, crops and head are benchmarked (default: the paper's)",
    )
    p.add_argument("--arch", default=None, help="override the config's model.arch")
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--batch", type=int, default=64, help="images per step (per GPU)")
    p.add_argument("--global-size", type=int, default=None)
    p.add_argument("--local-size", type=int, default=None)
    p.add_argument("--n-local", type=int, default=None)
    p.add_argument("--out-dim", type=int, default=None)
    p.add_argument("--variants", default="skip,skipless_init")
    p.add_argument("--optimizers", default="adamw,soap")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile our student/teacher")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend")
    p.add_argument("--official", action="store_true", help="also time the official-style step")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    p.add_argument("--loop", action="store_true", help="also time the trainer's whole loop")
    p.add_argument("--images", default=None, help="--loop: an image folder (default: synthetic)")
    p.add_argument("--workers", type=int, default=None, help="--loop: data.num_workers")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            for optimizer in args.optimizers.split(","):
                ours = bench_one(args, variant, optimizer, False, device)
                rows.append(ours)
                if args.loop:
                    ours |= bench_loop(args, ours["_cfg"], device, ours["_flops"], Path(tmp))
                if args.official:
                    off = bench_one(args, variant, optimizer, True, device, flops=ours["_flops"])
                    rows.append(off)
                    ours["speedup_vs_official"] = ours["img_per_s"] / off["img_per_s"]
    cfg = rows[0]["_cfg"]
    for r in rows:
        r["gflop_per_img"] = r["_flops"] / args.batch / 1e9 if r.get("_flops") else None
        r.pop("_flops", None)
        r.pop("_cfg", None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    m, a = cfg.model, cfg.aug
    print(
        f"\nDINO on {name}: {m.arch}/{m.patch_size}, batch {args.batch}, 2x{a.global_size}px + "
        f"{a.n_local}x{a.local_size}px, out_dim {cfg.dino.out_dim}; step: {args.steps} timed "
        f"steps after {args.warmup} warm-up; loop: {args.steps} after {args.steps}\n"
    )

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    headers = ["variant", "optimizer", "mode", "step img/s", "loop img/s", "step ms"]
    headers += ["GFLOP/img", "step MFU", "loop MFU", "peak GB", "speed-up"]
    table = markdown_table(
        headers,
        [
            [
                r["variant"],
                r["optimizer"],
                r["mode"],
                fmt(r["img_per_s"], ".1f"),
                fmt(r.get("loop_img_per_s"), ".1f"),
                fmt(r["step_ms"], ".1f"),
                fmt(r["gflop_per_img"], ".1f"),
                fmt(r["mfu"], ".1%"),
                fmt(r.get("loop_mfu"), ".1%"),
                fmt(r["peak_mem_gb"], ".2f"),
                fmt(r.get("speedup_vs_official"), ".2f"),
            ]
            for r in rows
        ],
    )
    print(table)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": name, "args": vars(args), "rows": rows}, indent=2)
        )
    return rows


if __name__ == "__main__":
    main()
