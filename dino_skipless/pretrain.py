"""``python -m dino_skipless.pretrain``: DINO pretraining of a (skipless) ViT.

    python -m dino_skipless.pretrain --config configs/quickstart_cpu.yaml
    python -m dino_skipless.pretrain --config configs/dino_vits16_skipless_init_adamw.yaml \\
        --data /path/to/imagenet/train --out runs/vits16 [optim.lr=1e-3 --teacher_temp 0.04]
    torchrun --nproc_per_node=8 -m dino_skipless.pretrain --config ... --data ...
    python -m dino_skipless.pretrain --out runs/vits16 --resume     # continue exactly

Settings: defaults (``dino_skipless.dino.config.PretrainConfig``, the published recipe), then
``--config YAML``, then overrides in order: ``key=value``, ``--key value`` or ``--key=value``
with a dotted key (``optim.lr``) or an unambiguous leaf (``lr``); shortcuts ``--data``
(data.path), ``--out`` (run.out), ``--batch-size`` (data.batch_size_per_gpu). ``--resume``
continues ``OUT/checkpoint.pt``; without ``--config`` it reuses the checkpoint's config.
``--debug`` shows the traceback of an error.
Writes OUT/{checkpoint.pt, log.jsonl, log.txt, config.yaml, backbone.pt, backbone.json,
summary.json}.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .cli import parse_config_args
from .data import DatasetError
from .dino.checkpoint import CHECKPOINT, ResumeError, load_checkpoint
from .dino.collapse import CollapseError
from .dino.config import ConfigError, build_config, config_from_dict, leaf_keys
from .dino.distributed import cleanup
from .dino.trainer import NonFiniteLossError, PretrainOOMError, train
from .errors import UserError

ALIASES = {
    "data": "data.path",
    "out": "run.out",
    "batch_size": "data.batch_size_per_gpu",
    "batch": "data.batch_size_per_gpu",
    "local_crops_number": "aug.n_local",
    "use_fp16": None,  # refused with a pointer to run.precision
}
USAGE = __doc__


def parse_args(argv: Sequence[str]) -> tuple[str | None, bool, bool, list[tuple[str, str]]]:
    """-> (config path, resume, print_config, [(key, value), ...]) in command-line order."""
    return parse_config_args(argv, ALIASES, USAGE, leaf_keys)


def resolve_config(argv: Sequence[str]):
    config_path, resume, show, overrides = parse_args(argv)
    own = resume and config_path is None
    # With the run's own config to come, the defaults + overrides only say where the run is:
    # the overrides are validated against the run's config (optim.epochs=2 on a run with one
    # warm-up epoch is fine, whatever the defaults' ten warm-up epochs say).
    cfg = build_config(config_path, overrides, validate=not own)
    if own:
        # continue with the checkpoint's own recipe (the user named only --out)
        ckpt = load_checkpoint(cfg.out_dir() / CHECKPOINT)
        base = config_from_dict(ckpt["config"])
        base.run.max_steps = None  # a test/debug stop is not part of the recipe
        base.run.out = str(cfg.out_dir())
        cfg = build_config(base=base, overrides=overrides)
    return cfg, resume, show


def main(argv: Sequence[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, resume, show = resolve_config(argv)
        if show:
            print(cfg.to_yaml())
            return cfg
        return train(cfg, resume_run=resume)
    except (
        ConfigError,
        ResumeError,
        DatasetError,
        NonFiniteLossError,
        CollapseError,
        PretrainOOMError,
        FileExistsError,
        UserError,
    ) as e:
        if "--debug" in argv:
            raise
        raise SystemExit(f"error: {e}") from None
    finally:
        cleanup()


if __name__ == "__main__":
    main()
