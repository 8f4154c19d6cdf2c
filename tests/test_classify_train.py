"""The supervised trainer: every variant x optimiser trains, evaluation, exact resume, accumulation,
non-finite losses, DDP, and one clear line for every bad input."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from dino_skipless.classifier.config import build_config
from dino_skipless.classifier.loop import NonFiniteLossError, TrainStep
from dino_skipless.classifier.trainer import Classifier, build_classifier, train
from dino_skipless.classify import main
from dino_skipless.dino.runlog import read_jsonl
from dino_skipless.dino.schedules import Schedules
from dino_skipless.loss_curves import main as curves_main
from dino_skipless.models import build_model, load_backbone

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]

# vit_mini of 2 blocks on 16 px crops (4 tokens), batch 4: seconds per run, the whole recipe on
# (RandAugment, random erasing, Mixup / CutMix, label smoothing).
TINY = {
    "model.arch": "vit_mini",
    "model.depth": 2,
    "model.patch_size": 8,
    "model.img_size": 16,
    "data.batch_size_per_gpu": 4,
    "data.accum_steps": 1,
    "data.num_workers": 0,
    "optim.epochs": 1,
    "optim.warmup_epochs": 0,
    "optim.lr": 1.0,  # x 4/4096: 1e-3
    "run.precision": "fp32",
    "run.log_every": 1,
    "run.progress": False,
    "run.tensorboard": False,
}
VARIANTS = ("skip", "skipless", "skipless_init")


def write_splits(root: Path, n_train: int = 24, n_val: int = 9, classes=("a", "b", "c")):
    """Three colour classes (each with noise), the same folders in train/ and val/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = i % len(classes)
            d = root / split / classes[c]
            d.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 60, (24, 24, 3))
            img[..., c % 3] += 190
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("sup"))


def tiny(out, data, **extra):
    return build_config(None, {**TINY, "data.path": str(data), "run.out": str(out), **extra})


@pytest.fixture(scope="module")
def six_runs(splits, tmp_path_factory):
    base = tmp_path_factory.mktemp("six")
    torch.set_num_threads(1)
    runs = {}
    for v in VARIANTS:
        for opt in ("adamw", "soap"):
            cfg = tiny(base / f"{v}_{opt}", splits, **{"model.variant": v, "optim.optimizer": opt})
            runs[(v, opt)] = (cfg, train(cfg))
    return runs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("opt", ["adamw", "soap"])
def test_each_variant_and_optimizer_trains(six_runs, variant, opt):
    cfg, r = six_runs[(variant, opt)]
    out = Path(cfg.run.out)
    assert r.finished and r.step == 24 // 4 == len(r.losses)
    assert all(math.isfinite(v) for v in r.losses)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["steps_per_epoch"] == 6
    assert (summary["n_train"], summary["n_val"], summary["num_classes"]) == (24, 9, 3)
    assert 0 <= summary["top1"] <= summary["top5"] == 100.0  # 3 classes: top-5 is everything
    assert [x["step"] for x in read_jsonl(out / "log.jsonl")] == list(range(6))
    (epoch,) = read_jsonl(out / "epochs.jsonl")
    assert epoch["top1"] == summary["top1"] and epoch["train_loss"] == pytest.approx(
        np.mean(r.losses)
    )
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["meta"]["variant"] == variant and ckpt["meta"]["optimizer"] == opt
    state = next(iter(ckpt["optimizer"]["state"].values()))
    assert ("Q" in state) == (opt == "soap")  # SOAP's eigenbases, AdamW's plain moments
    model, spec = load_backbone(out)  # the exported backbone, as the evaluation stages read it
    assert spec.variant == variant and spec.depth == 2
    init, _ = load_backbone(out / "init")
    assert not torch.equal(model.blocks[0].attn.qkv.weight, init.blocks[0].attn.qkv.weight)


def test_val_top1_top5_are_those_of_resize_and_centre_crop(six_runs, splits):
    """Recomputed independently: torchvision's resize (short side to floor(16 / 0.875) = 18,
    bicubic) + centre crop 16, the checkpoint's classifier, argmax / sorted logits by hand."""
    cfg, r = six_runs[("skipless_init", "adamw")]
    model = build_classifier(cfg, 3)
    model.load_state_dict(torch.load(Path(cfg.run.out) / "checkpoint.pt")["model"])
    model.eval()
    t = transforms.Compose([
        transforms.Resize(18, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(16), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip
    files = sorted((splits / "val").rglob("*.png"))
    x = torch.stack([t(Image.open(f).convert("RGB")) for f in files])
    y = torch.tensor([("a", "b", "c").index(f.parent.name) for f in files])
    with torch.no_grad():
        logits = model(x)
    assert r.top1 == pytest.approx(100 * int((logits.argmax(1) == y).sum()) / 9, abs=1e-9)
    top2 = int((logits.argsort(1, descending=True)[:, :2] == y[:, None]).any(1).sum())
    assert r.top1 <= 100 * top2 / 9 <= r.top5
    # every logit of every val image, through the mean cross-entropy
    summary = json.loads((Path(cfg.run.out) / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_resume_is_exact(tmp_path, splits):
    """Stopped mid-epoch (inside the 2nd), restarted with another worker count: the same
    weights, losses and epoch records as one uninterrupted run, with the whole recipe on and
    2 accumulated micro-batches per step."""
    extra = {"optim.epochs": 2, "optim.warmup_epochs": 1, "data.accum_steps": 2}
    straight = train(tiny(tmp_path / "a", splits, **extra))
    assert straight.step == 2 * (24 // 8)
    cut = train(tiny(tmp_path / "b", splits, **extra, **{"run.max_steps": 4}))
    assert cut.step == 4 and not cut.finished
    main(["--out", str(tmp_path / "b"), "--resume", "data.num_workers=1"])
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    keys = ("step", "loss", "loss_mean", "lr", "grad_norm")
    la, lb = read_jsonl(tmp_path / "a" / "log.jsonl"), read_jsonl(tmp_path / "b" / "log.jsonl")
    assert [[x[k] for k in keys] for x in la] == [[x[k] for k in keys] for x in lb]
    assert read_jsonl(tmp_path / "a" / "epochs.jsonl") == read_jsonl(
        tmp_path / "b" / "epochs.jsonl"
    )
    # not vacuous: training moved the weights, and Mixup made soft targets
    assert straight.losses[0] != straight.losses[-1]


def _step_fn(model, **kw):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = Schedules(lr=np.full(10, 1e-3), wd=np.full(10, 0.05))
    return TrainStep(model, opt, sched, **kw)


def test_accumulated_micro_batches_make_the_full_batch_step():
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

    def loss_fn(fwd, batch, step, k):
        return F.cross_entropy(fwd(batch[0]), batch[1]), {"seen": len(batch[1])}

    def stepped(micro):
        model = Classifier(build_model("vit_mini", "skip", depth=1, patch_size=8, img_size=16), 3)
        res = _step_fn(model)(0, micro, loss_fn)
        return model, res

    full, r_full = stepped([(x, y)])
    acc, r_acc = stepped([(x[:4], y[:4]), (x[4:], y[4:])])
    assert r_acc.loss == pytest.approx(r_full.loss, rel=1e-6) and r_acc.stats == {"seen": 8}
    # the gradient the optimizer stepped with: the mean over all 8 images either way (compared
    # before Adam, whose first step turns float noise in near-zero gradients into +-lr)
    for (name, a), b in zip(full.named_parameters(), acc.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert full.head.weight.grad.abs().max() > 1e-3


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped():
    model = torch.nn.Linear(3, 2)
    before = model.weight.detach().clone()

    def nan_loss(fwd, batch, step, k):
        return fwd(batch).sum() * float("nan"), {}

    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3"):
        _step_fn(model)(3, [torch.ones(2, 3)], nan_loss)
    step = _step_fn(model, on_nonfinite="skip")
    res = step(3, [torch.ones(2, 3)], nan_loss)
    assert res.loss is None and step.nonfinite_skipped == 1
    assert torch.equal(model.weight, before)


def _no_val(d: Path) -> None:
    (d / "x" / "train" / "a").mkdir(parents=True)


def _extra_val_class(d: Path) -> None:
    write_splits(d / "x")
    (d / "x" / "val" / "z").mkdir()
    Image.new("RGB", (8, 8)).save(d / "x" / "val" / "z" / "1.png")


def _corrupt_train_image(d: Path) -> None:
    write_splits(d / "x")
    (d / "x" / "train" / "a" / "00.png").write_bytes(b"not a png")


@pytest.mark.parametrize(
    "make, args, message",
    [
        (_no_val, ["--data", "{d}/x"], "no val/ folder"),
        (_corrupt_train_image, ["--data", "{d}/x"], "corrupt or truncated image"),
        pytest.param(
            None,
            ["run.device=cuda"],
            "run.device='cuda'",
            marks=pytest.mark.skipif(
                torch.cuda.is_available(), reason="needs a machine without CUDA"
            ),
        ),  # fmt: skip
        (None, ["--data", "{d}/missing"], "not a directory"),
        (_extra_val_class, ["--data", "{d}/x"], "different class folders"),
        (None, ["--out", "{d}/none", "--resume"], "no checkpoint at"),
        (None, ["--use_amp", "true"], "use run.precision"),
        (None, ["--learning_rate", "1"], "unknown config key 'learning_rate'"),
        (None, ["stray"], "unexpected argument 'stray'"),
        (None, ["--batch-size", "3"], "is odd"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, make, args, message):
    if make:
        make(tmp_path)
    argv = [a.format(d=tmp_path) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main([*[f"{k}={v}" for k, v in TINY.items()], *argv])
    msg = str(e.value)
    assert msg.startswith("error: ") and message in msg, msg
    assert "Traceback" not in msg and msg.endswith("(--debug shows the traceback)")


def test_a_fresh_start_refuses_an_existing_checkpoint(six_runs):
    cfg, _ = six_runs[("skip", "adamw")]
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        main(
            [f"{k}={v}" for k, v in TINY.items()] + ["--data", cfg.data.path, "--out", cfg.run.out]
        )


def test_fig1_command_draws_the_six_runs(six_runs, tmp_path):
    runs = [cfg.run.out for cfg, _ in six_runs.values()]
    out = tmp_path / "fig1.png"
    assert curves_main([*runs, "--out", str(out)]) == 0
    drawn = json.loads(out.with_suffix(".json").read_text())
    assert set(drawn["curves"]) == {f"{o}/{v}" for v in VARIANTS for o in ("adamw", "soap")}
    c = drawn["curves"]["soap/skipless"]
    _, r = six_runs[("skipless", "soap")]
    assert c["x"] == "epoch" and c["mean"] == pytest.approx(r.losses)  # one seed: its losses
    assert c["lo"] == c["hi"] == c["mean"]
    assert out.stat().st_size > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path, splits):
    """torchrun, 2 CPU processes of batch 2 = 1 process of batch 4 (Mixup/CutMix off: they pair
    images within a process's batch; label smoothing stays)."""
    over = {**TINY, "data.path": str(splits), "mixup.mixup_alpha": 0, "mixup.cutmix_alpha": 0,
            "model.variant": "skip", "optim.epochs": 2, "run.device": "cpu"}  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "dino_skipless.classify",
           *[f"{k}={v}" for k, v in over.items()], "data.batch_size_per_gpu=2",
           f"--out={tmp_path / 'ddp'}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x2" in (tmp_path / "ddp" / "log.txt").read_text()
    single = train(build_config(None, {**over, "run.out": str(tmp_path / "one")}))
    ddp = [x["loss"] for x in read_jsonl(tmp_path / "ddp" / "log.jsonl")]
    np.testing.assert_allclose(ddp, single.losses, rtol=1e-5, atol=1e-6)
    a = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert a["top1"] == single.top1 and a["total_batch"] == 4
    wa = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    # backbone.pt holds the weights beside their spec (models/loading.py export_payload)
    init = torch.load(tmp_path / "one" / "init" / "backbone.pt")["state_dict"]
    d = init["cls_token"].shape[-1]

    def masked(k, t):
        # the key bias (middle third of qkv.bias) has an exactly-zero gradient (softmax is
        # shift-invariant): Adam turns its float noise into +-lr steps in any implementation
        return torch.cat([t[:d], t[2 * d :]]) if k.endswith("attn.qkv.bias") else t

    err = max((masked(k, wa[k]) - masked(k, wb[k])).abs().max().item() for k in wa)
    moved = max((wb[f"backbone.{k}"] - v).abs().max().item() for k, v in init.items())
    assert err < 1e-2 * moved, (err, moved)  # the runs differ by far less than training moved
