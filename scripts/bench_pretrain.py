"""Benchmark one DINO training step: img/s, model FLOPs utilisation (MFU) and peak memory.

One step = teacher forward on the 2 global crops, student forward + backward on all crops, DINO
loss, per-parameter gradient clipping, optimizer step, EMA teacher update (what
``dino_skipless.dino.trainer`` does per iteration, minus data loading). For each variant x
optimizer it times our step ("ours": ``--precision`` autocast (bf16 by default, on a CPU too,
where the trainer itself stays fp32), timm's fused SDPA attention, fused AdamW on CUDA, foreach
clipping/EMA, optional ``torch.compile``) and, with ``--official``, the
step the way the official DINO code runs it in the same process ("official": fp16 autocast +
GradScaler, unfused attention (``attn.fused_attn = False``), eager, AdamW with
``foreach=False``, per-parameter Python loops for clipping and EMA), so the speed-up is a ratio
measured side by side on the same machine.

MFU = model FLOPs of one step (counted once with ``torch.utils.flop_counter.FlopCounterMode``
on our step; the same count is used for both modes) / step time / peak FLOP/s of the device
(known GPUs in ``PEAK_TFLOPS``, else ``--peak-tflops``).

    python scripts/bench_pretrain.py --device cuda --arch vit_small --batch 64 --official
    python scripts/bench_pretrain.py --device cpu --arch vit_mini --depth 2 --batch 8 \\
        --global-size 64 --local-size 32 --n-local 2 --out-dim 1024 --steps 3 --warmup 1 --official
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_skipless.dino import DINOLoss, ema_update_  # noqa: E402
from dino_skipless.dino.config import build_config  # noqa: E402
from dino_skipless.dino.runlog import memory_gb  # noqa: E402
from dino_skipless.dino.schedules import clip_gradients  # noqa: E402
from dino_skipless.dino.trainer import build_student_teacher  # noqa: E402
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


def make_crops(args, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(args.batch, 3, args.global_size, args.global_size, generator=g)] * 2
    crops += [torch.randn(args.batch, 3, args.local_size, args.local_size, generator=g)] * (
        args.n_local
    )
    return [c.to(device) for c in crops]


def build(args, variant: str, optimizer: str, official: bool, device: torch.device):
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
    cfg = build_config(None, {k: v for k, v in overrides.items() if v is not None})
    student, teacher = build_student_teacher(cfg)
    student.to(device)
    teacher.to(device)
    if official:
        for m in (student, teacher):
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
    loss_fn = DINOLoss(args.out_dim, 2 + args.n_local).to(device)
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
    if args.compile and not official:
        s_fwd, t_fwd = torch.compile(student), torch.compile(teacher)

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
    _, student, teacher, opt, loss_fn = build(args, variant, optimizer, official, device)
    step = step_fn(args, student, teacher, opt, loss_fn, official, device)
    crops = make_crops(args, device)
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
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--batch", type=int, default=64, help="images per step (per GPU)")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--variants", default="skip,skipless_init")
    p.add_argument("--optimizers", default="adamw,soap")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile our student/teacher")
    p.add_argument("--official", action="store_true", help="also time the official-style step")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
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
    for variant in args.variants.split(","):
        for optimizer in args.optimizers.split(","):
            ours = bench_one(args, variant, optimizer, False, device)
            rows.append(ours)
            if args.official:
                off = bench_one(args, variant, optimizer, True, device, flops=ours["_flops"])
                rows.append(off)
                ours["speedup_vs_official"] = ours["img_per_s"] / off["img_per_s"]
    for r in rows:
        r.pop("_flops", None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"\nDINO step on {name}: {args.arch}/{args.patch_size}, batch {args.batch}, 2x"
        f"{args.global_size}px + {args.n_local}x{args.local_size}px, out_dim {args.out_dim}, "
        f"{args.steps} timed steps after {args.warmup} warm-up\n"
    )

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    table = markdown_table(
        [
            "variant",
            "optimizer",
            "mode",
            "img/s",
            "step ms",
            "TFLOP/step",
            "MFU",
            "peak GB",
            "speed-up",
        ],
        [
            [
                r["variant"],
                r["optimizer"],
                r["mode"],
                fmt(r["img_per_s"], ".1f"),
                fmt(r["step_ms"], ".1f"),
                fmt(r["tflops_per_step"], ".3f"),
                fmt(r["mfu"], ".1%"),
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
