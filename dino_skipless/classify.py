"""``python -m dino_skipless.classify``: supervised training of a (skipless) ViT classifier.

The paper's Sec. 6.1 / Table 1 runs (ViT-B/16, ImageNet-1k, 3 variants x AdamW / SOAP):

    torchrun --nproc_per_node=8 -m dino_skipless.classify \\
        --config configs/sup_vitb16_skipless_init_soap.yaml --data /path/to/imagenet \\
        --out runs/sup_vitb16_skipless_init_soap
    python -m dino_skipless.classify --out runs/sup_vitb16_skipless_init_soap --resume
    python -m dino_skipless.classify --config configs/sup_cpu.yaml --variant skip   # CPU scale

``--data ROOT`` holds ``train/`` and ``val/`` class folders (ImageNet's layout); without it the
synthetic pattern classes are generated (cached). Settings: the recipe's defaults
(``dino_skipless.classifier.config.ClassifyConfig``), then ``--config YAML``, then overrides in
order (``key=value``, ``--key value``, dotted or an unambiguous leaf: ``optim.lr=1e-3``,
``--variant skip``); shortcuts ``--data`` (data.path), ``--out`` (run.out), ``--batch-size``
(data.batch_size_per_gpu). ``--resume`` continues ``OUT/checkpoint.pt`` exactly; without
``--config`` it reuses the checkpoint's config. ``--print-config`` prints the resolved config;
``--debug`` shows the traceback of an error (otherwise one line and exit status 1). Files written
into OUT: see ``dino_skipless/classifier/trainer.py``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from .classifier.config import ConfigError, build_config, config_from_dict, leaf_keys
from .classifier.loop import NonFiniteLossError
from .classifier.trainer import ClassifyOOMError, train
from .cli import error_message, parse_config_args
from .data import DatasetError
from .dino.checkpoint import CHECKPOINT, ResumeError, load_checkpoint
from .dino.distributed import cleanup
from .errors import UserError  # OutDirError (the --out lock), ...
from .models import CheckpointError

ALIASES = {
    "data": "data.path",
    "out": "run.out",
    "batch_size": "data.batch_size_per_gpu",
    "batch": "data.batch_size_per_gpu",
    "use_amp": None,  # weight-selection's flag: refused with a pointer to run.precision
}
USER_ERRORS = (
    ConfigError, ResumeError, DatasetError, NonFiniteLossError, ClassifyOOMError,
    FileExistsError, CheckpointError, UserError,
)  # fmt: skip


def resolve_config(argv: Sequence[str]):
    """-> (config, resume, print_config) from the command line."""
    path, resume, show, overrides = parse_config_args(argv, ALIASES, __doc__, leaf_keys)
    cfg = build_config(path, overrides)
    if resume and path is None:  # continue with the checkpoint's own recipe
        ckpt = load_checkpoint(cfg.out_dir() / CHECKPOINT, required=("model", "loop", "meta"))
        base = config_from_dict(ckpt["config"])
        base.run.max_steps = None  # a test/debug stop is not part of the recipe
        base.run.out = str(cfg.out_dir())
        cfg = build_config(base=base, overrides=overrides)
    return cfg, resume, show


def main(argv: Sequence[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg, resume, show = resolve_config(argv)
        if show:
            print(cfg.to_yaml())
            return cfg
        result = train(cfg, resume_run=resume)
        print(json.dumps({"out": str(result.out_dir), "step": result.step,
                          "finished": result.finished, "final_loss": result.final_loss,
                          "top1": result.top1, "top5": result.top5}))  # fmt: skip
        return result
    except USER_ERRORS as e:
        if "--debug" in argv:
            raise
        raise SystemExit(f"error: {error_message(e)}\n(--debug shows the traceback)") from None
    finally:
        cleanup()


if __name__ == "__main__":
    main()
