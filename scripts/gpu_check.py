"""One command that validates a GPU for DINO pretraining, and records what it finds.

    python scripts/gpu_check.py --out DIR                        # one CUDA device, <= 8 minutes
    python scripts/gpu_check.py --device cpu --tiny --out DIR    # the same checks, tiny (tested)

Writes ``DIR/gpu_check.json`` (every figure) and ``DIR/gpu_check.md`` (a table), after each check,
so a run cut short keeps what it measured. Each check is independent; one that fails is recorded
with its error and the others still run; the exit status is 1 if any check failed.

1. ``versions``: device name, torch, CUDA, cuDNN and timm versions.
2. ``augmentation``: the batched crops (``data.augment_on: device``) on the device against the
   same plan on the CPU, and against the official PIL crops (mean and max per-pixel difference,
   in 1/255); with ``decode_on: device`` (nvJPEG) against PIL's decode.
3. ``sdpa``: which scaled-dot-product-attention kernel the ViT's attention runs (flash, cuDNN,
   efficient or math), from the profiler's kernel names.
4. ``throughput``: ``scripts/bench_pretrain.py`` at two batch sizes (64 and 128), eager and
   compiled: the step alone and the trainer's whole loop (img/s, MFU, peak memory), and the
   official-style step for the speed-up.
5. ``syncs``: host syncs per training step (``torch.cuda.set_sync_debug_mode`` on CUDA; the
   counted calls of ``dino_skipless.dino.hostsync`` on a CPU): zero expected except on logging
   steps.
6. ``loader``: CPU ms per image of a loader worker (official path and device path).
7. ``tokencut``: TokenCut ms/image on the device against the CPU, and whether the boxes are
   identical.
8. ``torchrun``: a 2-step ``torchrun --nproc_per_node=1`` pretraining (NCCL on CUDA, gloo on a
   CPU): the process group, DDP and the collectives for real.
9. ``precision``: 8 steps of fp16 + GradScaler and of bf16 from the same start on the same crops:
   finite and close; and the teacher targets (T = 0.04) under bf16 autocast against fp32.

``--tiny``: a 2-block ``vit_mini`` on 32/16 px crops, batches 8 and 16, a few steps, compiled with
``aot_eager`` (the same graph capture, no code generation), so the whole check runs in minutes
on a CPU (``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dino_skipless.data import ImageFolderDataset  # noqa: E402
from dino_skipless.data.scenes import render_scene  # noqa: E402
from dino_skipless.dino import MultiCropAugmentation  # noqa: E402
from dino_skipless.dino.augment_device import (  # noqa: E402
    SeededDecode,
    collate_decoded,
    device_multicrop,
)
from dino_skipless.dino.config import build_config  # noqa: E402
from dino_skipless.dino.hostsync import count_train_syncs  # noqa: E402
from dino_skipless.dino.sampling import SeededMultiCrop  # noqa: E402
from dino_skipless.dino.trainer import build_loss, build_student_teacher  # noqa: E402
from dino_skipless.fileio import markdown_table, write_report  # noqa: E402
from dino_skipless.optim import build_optimizer, get_param_groups  # noqa: E402


@dataclass
class Setup:
    """The sizes of one mode (full: the paper's ViT-S/16 recipe on one GPU; tiny: a CPU test)."""

    model: dict
    batches: tuple[int, ...]
    steps: int
    warmup: int
    image_wh: tuple[int, int]
    n_images: int
    compile_backend: str
    tokencut_arch: dict
    tokencut_n: int
    tokencut_size: int


FULL = Setup(
    model={},  # configs/dino_vits16_skipless_init_adamw.yaml's values (the defaults)
    batches=(64, 128),
    steps=10,
    warmup=3,
    image_wh=(500, 375),
    n_images=2 * 10 * 128,
    compile_backend="inductor",
    tokencut_arch={"arch": "vit_small", "patch_size": 16},
    tokencut_n=20,
    tokencut_size=448,
)
TINY = Setup(
    model={
        "model.arch": "vit_mini",
        "model.depth": 2,
        "model.patch_size": 8,
        "aug.global_size": 32,
        "aug.local_size": 16,
        "aug.n_local": 2,
        "dino.out_dim": 256,
        "dino.head_hidden_dim": 64,
        "dino.head_bottleneck_dim": 32,
    },
    batches=(8, 16),
    steps=2,
    warmup=1,
    image_wh=(64, 48),
    n_images=2 * 2 * 16,
    compile_backend="aot_eager",
    tokencut_arch={"arch": "vit_mini", "patch_size": 8, "depth": 2},
    tokencut_n=4,
    tokencut_size=64,
)


class Context:
    def __init__(self, args, setup: Setup, device: torch.device, tmp: Path) -> None:
        self.args, self.setup, self.device, self.tmp = args, setup, device, tmp
        self.images = write_jpegs(tmp / "images", setup.n_images, *setup.image_wh)
        self.cfg = build_config(REPO / "configs/dino_vits16_skipless_init_adamw.yaml", setup.model)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def write_jpegs(folder: Path, n: int, width: int, height: int) -> Path:
    sub = folder / "scenes"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (height, width) if i % 4 == 3 else (width, height)
        Image.fromarray(render_scene(rng, h, w).image).save(sub / f"{i:05d}.jpg", quality=90)
    return folder


def _bench_pretrain():
    spec = importlib.util.spec_from_file_location(
        "bench_pretrain", REPO / "scripts/bench_pretrain.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# The checks: each returns a dict with "ok" and its figures
# ---------------------------------------------------------------------------------------------


def check_versions(c: Context) -> dict:
    import timm
    import torchvision

    cuda = c.device.type == "cuda"
    return {
        "ok": True,
        "device": torch.cuda.get_device_name(c.device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def _per_pixel(a: list[torch.Tensor], b: list[torch.Tensor], std: torch.Tensor) -> dict:
    d = [((x.cpu() - y.cpu()) * std).abs() * 255 for x, y in zip(a, b)]
    return {
        "mean": float(torch.stack([t.mean() for t in d]).mean()),
        "max": float(max(t.max() for t in d)),
    }


def check_augmentation(c: Context) -> dict:
    aug = c.cfg.aug
    base = ImageFolderDataset(c.images)
    n = min(c.setup.batches[0], len(base))
    std = torch.tensor(aug.std).view(1, 3, 1, 1)
    worker = SeededDecode(base, aug, seed=0)
    batch = collate_decoded([worker[(0, i)] for i in range(n)], aug)
    on_device = device_multicrop(batch, aug, c.device)
    on_cpu = device_multicrop(batch, aug, "cpu")
    official = SeededMultiCrop(base, MultiCropAugmentation(aug), seed=0)
    views = [torch.stack(v) for v in zip(*[official[(0, i)] for i in range(n)])]
    encoded = SeededDecode(base, aug, seed=0, encoded=True)
    nvjpeg = device_multicrop(
        collate_decoded([encoded[(0, i)] for i in range(n)], aug), aug, c.device
    )
    out = {
        "images": n,
        "device_vs_cpu_plan": _per_pixel(on_device, on_cpu, std),
        "device_vs_official_pil": _per_pixel(on_device, views, std),
        "decode_on_device_vs_pil_decode": _per_pixel(nvjpeg, on_device, std),
    }
    out["ok"] = (
        out["device_vs_cpu_plan"]["mean"] < 0.25 and out["device_vs_official_pil"]["mean"] < 4
    )
    return out


def check_sdpa(c: Context) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from dino_skipless.models import build_model

    m = c.cfg.model
    model = build_model(m.arch, m.variant, seed=0, patch_size=m.patch_size, depth=m.depth)
    model = model.to(c.device).eval()
    x = torch.randn(8, 3, c.cfg.aug.global_size, c.cfg.aug.global_size, device=c.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if c.device.type == "cuda" else [])
    ctx = torch.autocast(c.device.type, dtype=torch.bfloat16)
    with torch.no_grad(), ctx:
        model(x)
        c.sync()
        with profile(activities=acts) as prof:
            model(x)
            c.sync()
    names = {e.name for e in prof.events()}
    found = []
    for label, keys in (
        ("flash", ("flash",)),
        ("cudnn", ("cudnn_attention", "cudnn_sdpa", "sm90_fprop", "cudnn::")),
        ("efficient", ("efficient_attention", "fmha", "mem_eff")),
        ("math", ("_scaled_dot_product_attention_math",)),
    ):
        hits = sorted(n for n in names if any(k in n.lower() for k in keys))
        if hits:
            found.append({"backend": label, "names": hits[:4]})
    return {"ok": bool(found), "backend": found[0]["backend"] if found else None, "found": found}


def check_throughput(c: Context) -> dict:
    bench = _bench_pretrain()
    s = c.setup
    common = ["--config", str(REPO / "configs/dino_vits16_skipless_init_adamw.yaml")]
    common += ["--device", str(c.device), "--variants", "skipless_init", "--optimizers", "adamw"]
    common += ["--steps", str(s.steps), "--warmup", str(s.warmup), "--loop"]
    common += ["--images", str(c.images), "--compile-backend", s.compile_backend]
    common += [
        "--workers",
        str(c.args.workers if c.args.workers is not None else (0 if c.args.tiny else 10)),
    ]
    if c.args.peak_tflops:
        common += ["--peak-tflops", str(c.args.peak_tflops)]
    for key, flag in (
        ("model.arch", "--arch"),
        ("model.depth", "--depth"),
        ("model.patch_size", "--patch-size"),
        ("aug.global_size", "--global-size"),
        ("aug.local_size", "--local-size"),
        ("aug.n_local", "--n-local"),
        ("dino.out_dim", "--out-dim"),
    ):
        if key in s.model:
            common += [flag, str(s.model[key])]
    rows = []
    for batch in s.batches:
        for compiled in (False, True):
            argv = [*common, "--batch", str(batch)] + (
                ["--compile"] if compiled else ["--official"]
            )
            for r in bench.main(argv):
                rows.append({"batch": batch, **r})
    ours = [r for r in rows if r["mode"] != "official"]
    ok = all(r["img_per_s"] and r.get("loop_img_per_s") for r in ours)
    return {"ok": ok, "rows": rows}


def check_syncs(c: Context) -> dict:
    s = c.setup
    steps = 2 * max(s.steps, 3)
    overrides = {
        **s.model,
        "data.path": str(c.images),
        "data.batch_size_per_gpu": s.batches[0],
        "data.augment_on": "device",
        "data.num_workers": 0 if c.args.tiny else 4,
        "run.device": str(c.device),
        "run.max_steps": steps,
        "run.log_every": 3,
        "run.out": str(c.tmp / "syncs"),
        "run.progress": False,
        "run.tensorboard": False,
        "run.keep_epochs": [],
        "run.saveckp_freq": 0,
        "optim.warmup_epochs": 0,
    }
    if c.args.tiny:
        overrides["run.precision"] = "fp32"
    records = count_train_syncs(build_config(None, overrides))
    quiet = [r for r in records if not r["logged"]]
    loud = [r for r in records if r["logged"]]
    where = {r["step"]: r["calls"][:3] for r in quiet if r["syncs"]}
    return {
        "ok": not where,
        "method": "set_sync_debug_mode" if c.device.type == "cuda" else "counted calls",
        "steps": len(records),
        "max_syncs_non_logging_step": max((r["syncs"] for r in quiet), default=0),
        "mean_syncs_logging_step": float(np.mean([r["syncs"] for r in loud])) if loud else 0.0,
        "non_logging_steps_with_syncs": where,
    }


def check_loader(c: Context) -> dict:
    aug = c.cfg.aug
    base = ImageFolderDataset(c.images)
    idx = list(range(min(32, len(base))))

    def cpu_ms(fn) -> float:
        t0 = time.process_time()
        fn()
        return (time.process_time() - t0) * 1e3 / len(idx)

    official = SeededMultiCrop(base, MultiCropAugmentation(aug), seed=0)
    worker = SeededDecode(base, aug, seed=0)
    encoded = SeededDecode(base, aug, seed=0, encoded=True)
    out = {
        "images": len(idx),
        "image_size": list(c.setup.image_wh),
        "official_cpu_ms_per_image": cpu_ms(lambda: [official[(0, i)] for i in idx]),
        "device_path_cpu_ms_per_image": cpu_ms(
            lambda: collate_decoded([worker[(0, i)] for i in idx], aug)
        ),
        "decode_on_device_cpu_ms_per_image": cpu_ms(
            lambda: collate_decoded([encoded[(0, i)] for i in idx], aug)
        ),
    }
    out["ok"] = out["device_path_cpu_ms_per_image"] < out["official_cpu_ms_per_image"]
    return out


def check_tokencut(c: Context) -> dict:
    from dino_skipless.data import build_detection_dataset, synthetic_root
    from dino_skipless.features import extract
    from dino_skipless.models import build_model
    from tokencut.ncut import TokenCutConfig, tokencut_batch
    from tokencut.run import _Images, bucket_batches, plan_images

    a = c.setup.tokencut_arch
    model = build_model(a["arch"], "skip", seed=0, patch_size=a["patch_size"], depth=a.get("depth"))
    model = model.eval()
    root = synthetic_root("voc", n=c.setup.tokencut_n, size=c.setup.tokencut_size, seed=0)
    ds = build_detection_dataset("voc12", root)
    plan = plan_images(ds, a["patch_size"], no_hard=False)
    images = _Images(ds, plan.items, a["patch_size"])
    batches = bucket_batches(plan.items, a["patch_size"], 16)
    cfg = TokenCutConfig()

    def run(device: torch.device) -> tuple[list, float]:
        m = model.to(device)
        boxes, t = [], 0.0
        for b in batches:
            x = torch.stack([images[k][0] for k in b]).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            f = extract(m, x, [-1], kind="k")
            res = tokencut_batch(
                f.patches(len(m.blocks) - 1),
                f.grid,
                a["patch_size"],
                [plan.items[k].hw for k in b],
                cfg,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t += time.perf_counter() - t0
            boxes += [tuple(np.asarray(r.box).tolist()) for r in res]
        return boxes, t * 1e3 / len(plan.items)

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the same fp32 features on both devices
    try:
        run(c.device)  # warm-up
        dev_boxes, dev_ms = run(c.device)
        cpu_boxes, cpu_ms = run(torch.device("cpu"))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    same = sum(x == y for x, y in zip(dev_boxes, cpu_boxes))
    return {
        "ok": same == len(cpu_boxes),
        "images": len(cpu_boxes),
        "identical_boxes": same,
        "device_ms_per_image": dev_ms,
        "cpu_ms_per_image": cpu_ms,
        "speedup": cpu_ms / dev_ms,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_torchrun(c: Context) -> dict:
    out = c.tmp / "torchrun"
    overrides = {
        **c.setup.model,
        "data.path": str(c.images),
        "data.batch_size_per_gpu": c.setup.batches[0],
        "data.num_workers": 0 if c.args.tiny else 2,
        "run.device": str(c.device),
        "run.max_steps": 2,
        "run.log_every": 1,
        "run.progress": False,
        "run.tensorboard": False,
        "run.keep_epochs": [],
        "optim.warmup_epochs": 0,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1"]
    cmd += [f"--master_port={_free_port()}", "-m", "dino_skipless.pretrain", f"--out={out}"]
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=c.tmp, capture_output=True, text=True, timeout=300)
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    records = (
        [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        if (out / "log.jsonl").exists()
        else []
    )
    return {
        "ok": proc.returncode == 0 and len(records) == 2 and "x1" in log,
        "backend": "nccl" if c.device.type == "cuda" else "gloo",
        "returncode": proc.returncode,
        "steps_logged": len(records),
        "losses": [r["loss"] for r in records],
        "seconds": time.perf_counter() - t0,
        "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
    }


def _steps(c: Context, dtype: torch.dtype, scaler: bool, crops, n: int) -> list[float]:
    """``n`` DINO steps under ``dtype`` autocast from the seeded init on fixed crops."""
    cfg = replace(c.cfg)
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    student.to(c.device)
    teacher.to(c.device)
    loss_fn = build_loss(cfg).to(c.device)
    opt = build_optimizer("adamw", get_param_groups(student), lr=1e-4, weight_decay=0.04)
    gs = torch.amp.GradScaler(c.device.type) if scaler else None
    losses = []
    for _ in range(n):
        with torch.autocast(c.device.type, dtype=dtype):
            with torch.no_grad():
                t_out = teacher(crops[:2])
            loss = loss_fn(student(crops), t_out, 0)
        opt.zero_grad(set_to_none=True)
        if gs is not None:
            gs.scale(loss).backward()
            gs.step(opt)
            gs.update()
        else:
            loss.backward()
            opt.step()
        losses.append(float(loss))
    return losses


def check_precision(c: Context) -> dict:
    g = torch.Generator().manual_seed(0)
    a = c.cfg.aug
    batch = c.setup.batches[0] // 2
    sizes = [a.global_size] * 2 + [a.local_size] * int(a.n_local)
    crops = [torch.randn(batch, 3, s, s, generator=g).to(c.device) for s in sizes]
    fp16 = _steps(c, torch.float16, True, crops, 8)
    bf16 = _steps(c, torch.bfloat16, False, crops, 8)
    gap = max(abs(x - y) / abs(y) for x, y in zip(fp16, bf16))
    # the teacher targets: the head runs in fp32 under autocast (dino/head.py)
    torch.manual_seed(0)
    _, teacher = build_student_teacher(c.cfg)
    teacher.to(c.device)
    with torch.no_grad():
        feats = teacher.backbone(crops[0])
        ref = F.softmax(teacher.head(feats) / 0.04, dim=-1)
        rel = {}
        for tf32 in (False, True):
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                with torch.autocast(c.device.type, dtype=torch.bfloat16):
                    q = F.softmax(teacher.head(feats).float() / 0.04, dim=-1)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
            keep = ref > 1e-6
            rel[f"tf32_{str(tf32).lower()}"] = float(((q - ref).abs() / ref)[keep].max())
    finite = all(np.isfinite(fp16 + bf16))
    return {
        "ok": finite and gap < 0.05,
        "fp16_gradscaler_losses": fp16,
        "bf16_losses": bf16,
        "max_relative_gap": gap,
        "teacher_target_max_rel_vs_fp32": rel,
    }


CHECKS = {
    "versions": check_versions,
    "augmentation": check_augmentation,
    "sdpa": check_sdpa,
    "syncs": check_syncs,
    "loader": check_loader,
    "precision": check_precision,
    "torchrun": check_torchrun,
    "tokencut": check_tokencut,
    "throughput": check_throughput,  # last: the longest; --budget-s may cut it short
}


def summary(name: str, r: dict) -> str:
    """One cell of figures for the Markdown table."""
    if "error" in r:
        return r["error"].splitlines()[-1][:120]
    if r.get("skipped"):
        return r["skipped"]
    if name == "versions":
        return f"{r['device']}; torch {r['torch']}, CUDA {r['cuda']}, timm {r['timm']}"
    if name == "augmentation":
        d, o, j = (
            r["device_vs_cpu_plan"],
            r["device_vs_official_pil"],
            r["decode_on_device_vs_pil_decode"],
        )
        return (
            f"vs CPU plan mean {d['mean']:.3f} max {d['max']:.2f}; vs PIL mean {o['mean']:.2f} max "
            f"{o['max']:.1f}; device decode vs PIL decode mean {j['mean']:.3f} (1/255)"
        )
    if name == "sdpa":
        return f"{r['backend']}: {', '.join(r['found'][0]['names'][:2]) if r['found'] else '-'}"
    if name == "throughput":
        cells = []
        for x in r["rows"]:
            loop = f", loop {x['loop_img_per_s']:.0f}" if x.get("loop_img_per_s") else ""
            mfu = f" ({x['mfu']:.0%} MFU)" if x.get("mfu") else ""
            cells.append(
                f"b{x['batch']} {x['mode']}: step {x['img_per_s']:.0f}{mfu}{loop} img/s, {x['peak_mem_gb']:.1f} GB"
            )
        return "; ".join(cells)
    if name == "syncs":
        return (
            f"{r['method']}: max {r['max_syncs_non_logging_step']} per non-logging step, "
            f"{r['mean_syncs_logging_step']:.1f} per logging step ({r['steps']} steps)"
        )
    if name == "loader":
        return (
            f"CPU ms/image: official {r['official_cpu_ms_per_image']:.1f}, device path "
            f"{r['device_path_cpu_ms_per_image']:.1f}, decode on device "
            f"{r['decode_on_device_cpu_ms_per_image']:.1f}"
        )
    if name == "tokencut":
        return (
            f"{r['device_ms_per_image']:.1f} vs CPU {r['cpu_ms_per_image']:.1f} ms/image; "
            f"{r['identical_boxes']}/{r['images']} boxes identical"
        )
    if name == "torchrun":
        return f"{r['backend']}, rc {r['returncode']}, losses {r['losses']}"
    if name == "precision":
        t = r["teacher_target_max_rel_vs_fp32"]
        return (
            f"fp16+scaler vs bf16 max rel gap {r['max_relative_gap']:.2e}; teacher targets vs "
            f"fp32 {t['tf32_false']:.1e} ({t['tf32_true']:.1e} with TF32)"
        )
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model: the checks in minutes")
    p.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    p.add_argument("--budget-s", type=float, default=480.0, help="skip checks started after this")
    p.add_argument("--workers", type=int, default=None, help="loader workers of the loop runs")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU on an unknown GPU")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: gpu_check: --device cuda but CUDA is not available here; "
            "--device cpu --tiny runs the checks on the CPU"
        )
    setup = TINY if args.tiny else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join(["python scripts/gpu_check.py", *(argv or sys.argv[1:])])}
    record |= {"mode": "tiny" if args.tiny else "full", "checks": {}}
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(args, setup, device, Path(tmp))
        for name in args.checks:
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget_s:
                result = {"ok": False, "skipped": f"not started: {elapsed:.0f} s > --budget-s"}
            else:
                t0 = time.perf_counter()
                try:
                    result = CHECKS[name](ctx)
                except Exception as e:  # noqa: BLE001 - every check reports, none stops the rest
                    result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                    result["traceback"] = traceback.format_exc()[-3000:]
                result["seconds"] = time.perf_counter() - t0
            record["checks"][name] = result
            rows.append(
                [
                    name,
                    "ok" if result["ok"] else "FAIL",
                    f"{result.get('seconds', 0):.1f}",
                    summary(name, result),
                ]
            )
            record["seconds"] = time.perf_counter() - t_start
            text = markdown_table(["check", "result", "s", "figures"], rows) + "\n"
            write_report(out / "gpu_check", record, text)
            print(f"{name}: {rows[-1][1]} ({rows[-1][2]} s) {rows[-1][3]}", flush=True)
    failed = [n for n, r in record["checks"].items() if not r["ok"]]
    print(
        f"gpu_check: {len(record['checks']) - len(failed)}/{len(record['checks'])} checks passed "
        f"in {record['seconds']:.0f} s; {out / 'gpu_check.md'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
