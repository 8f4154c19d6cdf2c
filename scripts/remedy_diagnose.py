"""Where a low-information run loses the image: how much of the teacher's output at each stage of
the network differs between images, at a fresh init and at the run's last checkpoint (README,
"A remedy for low-information images").

    python scripts/remedy_diagnose.py runs/remedy/dgp_lr3e-4 runs/remedy/dgp_t02 \
        --out results/remedy/diagnose

Per stage -- the backbone's CLS features, the head's bottleneck (before its L2 normalisation),
the prototype logits -- the *image-dependent energy share*: sum_i |f_i - mean f|^2 / sum_i
|f_i|^2 over the images (0: every image gets the same vector; 1: no shared component). And the
spread the teacher's softmax sees: the standard deviation of logit / T over the prototypes,
per image (mean over images), at the run's final teacher temperature. A target is nearly
uniform when that spread is well below 1. Images: every k-th of the run's own pretraining
world (``--n`` of them), resized to the global crop size, no augmentation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from dino_skipless.data.imagefolder import ImageFolderDataset
from dino_skipless.data.worlds import pretrain_root
from dino_skipless.dino.config import config_from_dict
from dino_skipless.dino.trainer import build_student_teacher
from dino_skipless.features import normalize_image
from dino_skipless.fileio import markdown_table, write_report


def energy_share(f: torch.Tensor) -> float:
    """Share of the rows' energy that is not their common mean."""
    f = f.double()
    return float(((f - f.mean(0)) ** 2).sum() / (f**2).sum())


def images(cfg, n: int) -> torch.Tensor:
    d = cfg.data
    # config.yaml records --data portably ($SKIPLESS_CACHE/..., ~/...); a missing folder gets
    # ImageFolderDataset's error with the expected layout
    root = (
        Path(os.path.expandvars(d.path)).expanduser()
        if d.path
        else pretrain_root(d.world, d.synthetic_n, d.synthetic_size, d.synthetic_seed)
    )
    paths = [p for p, _ in ImageFolderDataset(root).samples]
    size = cfg.aug.global_size
    pick = paths[:: max(1, len(paths) // n)][:n]
    arr = [np.array(Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)) for p in pick]
    return normalize_image(torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float() / 255)


@torch.no_grad()
def stages(teacher, x: torch.Tensor, temp: float) -> dict:
    cls = teacher.backbone(x)
    bottleneck = teacher.head.mlp(cls.float())
    logits = teacher.head.last_layer(F.normalize(bottleneck, dim=-1))
    return {
        "cls": energy_share(cls),
        "bottleneck": energy_share(bottleneck),
        "logits": energy_share(logits),
        "logit_spread": float((logits / temp).std(dim=1).mean()),
    }


def diagnose(run: Path, n: int) -> dict:
    missing = [f for f in ("config.yaml", "checkpoint.pt") if not (run / f).is_file()]
    if missing:
        raise SystemExit(f"{run}: no {' or '.join(missing)}; expected a pretraining run folder "
                         "(python -m dino_skipless.pretrain --out RUN)")  # fmt: skip
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    torch.manual_seed(cfg.run.seed)
    _, teacher = build_student_teacher(cfg)
    x = images(cfg, n)
    temp = cfg.dino.teacher_temp
    out = {"init": stages(teacher.eval(), x, temp)}
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    teacher.load_state_dict(ckpt["teacher"])
    scale = float(ckpt.get("teacher_temp_scale") or 1.0)
    out["checkpoint"] = stages(teacher.eval(), x, temp * scale) | {"step": int(ckpt["step"])}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--n", type=int, default=256, help="images")
    p.add_argument("--out", type=Path, default=None, help="OUT.md + OUT.json")
    args = p.parse_args(argv)
    record, rows = {}, []
    for run in args.runs:
        rec = record[run.name] = diagnose(run, args.n)
        for when in ("init", "checkpoint"):
            r = rec[when]
            at = "fresh init" if when == "init" else f"step {r['step']}"
            rows.append([run.name, at, *(f"{r[k]:.3g}" for k in ("cls", "bottleneck", "logits")),
                         f"{r['logit_spread']:.3g}"])  # fmt: skip
    text = "# Where the image is lost\n\n" + markdown_table(
        ["run", "teacher at", "image-dependent share: CLS", "bottleneck", "logits",
         "logit / T spread over prototypes"], rows,
    )  # fmt: skip
    if args.out:
        write_report(args.out, record, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
