"""PretrainConfig: published defaults, YAML + overrides, clear errors, shipped configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from dino_skipless.dino.checkpoint import ResumeError, check_resume_config
from dino_skipless.dino.config import (
    ConfigError,
    PretrainConfig,
    build_config,
    config_from_dict,
    leaf_keys,
    load_yaml,
)
from dino_skipless.pretrain import parse_args, resolve_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_published_recipe():
    c = PretrainConfig()
    published = {
        # facebookresearch/dino main_dino.py defaults + README boosted ViT-S/16
        ("optim", "epochs"): 300,
        ("optim", "lr"): 0.0005,
        ("optim", "min_lr"): 1e-6,
        ("optim", "warmup_epochs"): 10,
        ("optim", "weight_decay"): 0.04,
        ("optim", "weight_decay_end"): 0.4,
        ("optim", "clip_grad"): 3.0,
        ("optim", "freeze_last_layer"): 1,
        ("optim", "optimizer"): "adamw",
        ("dino", "out_dim"): 65536,
        ("dino", "norm_last_layer"): False,
        ("dino", "use_bn_in_head"): False,
        ("dino", "momentum_teacher"): 0.996,
        ("dino", "warmup_teacher_temp"): 0.04,
        ("dino", "teacher_temp"): 0.07,
        ("dino", "warmup_teacher_temp_epochs"): 30,
        ("dino", "student_temp"): 0.1,
        ("dino", "center_momentum"): 0.9,
        ("data", "batch_size_per_gpu"): 64,
        ("aug", "n_local"): 8,
        ("aug", "global_size"): 224,
        ("aug", "local_size"): 96,
        ("model", "arch"): "vit_small",
        ("model", "patch_size"): 16,
        ("model", "variant"): "skipless_init",
        ("model", "drop_path"): 0.0,  # the paper (official DINO: 0.1)
        ("model", "alpha"): 1.8,  # paper, DINO ViT-S
        ("model", "beta"): 1.0,
        ("model", "c"): 3.0,
        ("run", "seed"): 0,
        ("run", "saveckp_freq"): 20,
        ("run", "keep_epochs"): [200, 300],
        ("run", "precision"): "bf16",
    }
    for (section, key), value in published.items():
        assert getattr(getattr(c, section), key) == value, (section, key)
    assert c.n_crops == 10 and c.out_dir() == Path("runs/pretrain")


def test_yaml_then_overrides_in_order(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump({"optim": {"lr": 0.001, "epochs": 50}, "aug": {"n_local": 6}}))
    cfg = build_config(
        f,
        [
            ("optim.lr", "2e-3"),  # YAML 1.1 reads "2e-3" as a string: still a float here
            ("teacher_temp", "0.05"),  # unique leaf name
            ("aug.global_scale", "[0.3, 1.0]"),
            ("keep_epochs", "10,20"),
            ("depth", "9"),
            ("norm_last_layer", "true"),
            ("optim.epochs", "60"),
        ],
    )
    assert cfg.optim.lr == 0.002 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 60 and cfg.aug.n_local == 6
    assert cfg.dino.teacher_temp == 0.05 and cfg.model.depth == 9
    assert cfg.aug.global_scale == (0.3, 1.0) and cfg.run.keep_epochs == [10, 20]
    assert cfg.dino.norm_last_layer is True
    assert cfg.name == "exp" and cfg.out_dir() == Path("runs/exp")
    # round trip through the dict stored in checkpoints / config.yaml
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_unknown_and_ambiguous_keys_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'.*optim.lr"):
        build_config(None, {"learning_rate": 1})
    with pytest.raises(ConfigError, match="ambiguous.*optim.adamw.eps.*optim.soap.eps"):
        build_config(None, {"eps": 1e-6})
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) optim.lrr; valid keys in optim: .*lr"):
        load_yaml(f)
    with pytest.raises(ConfigError, match="optim.epochs: expected int, got 'ten'"):
        build_config(None, {"epochs": "ten"})
    with pytest.raises(ConfigError, match="model.variant='resnet'.*skip, skipless, skipless_init"):
        build_config(None, {"variant": "resnet"})
    with pytest.raises(ConfigError, match="not a multiple of model.patch_size"):
        build_config(None, {"aug.local_size": 100})
    with pytest.raises(ConfigError, match="drop_path"):
        build_config(None, {"model.drop_path": 0.1})
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_cli_forms():
    config, resume, show, ov = parse_args(
        [
            "--config",
            "x.yaml",
            "--data",
            "/img",
            "--variant",
            "skip",
            "--epochs=5",
            "optim.lr=1e-3",
            "--compile",
            "--out",
            "o",
            "--resume",
            "--batch-size",
            "8",
        ]
    )
    assert config == "x.yaml" and resume and not show
    assert ov == [
        ("data.path", "/img"),
        ("variant", "skip"),
        ("epochs", "5"),
        ("optim.lr", "1e-3"),
        ("compile", "true"),
        ("run.out", "o"),
        ("data.batch_size_per_gpu", "8"),
    ]
    cfg, _, _ = resolve_config(["--variant", "skip", "--arch=vit_tiny", "--depth", "9", "lr=1e-3"])
    assert (cfg.model.variant, cfg.model.arch, cfg.model.depth, cfg.optim.lr) == (
        "skip",
        "vit_tiny",
        9,
        1e-3,
    )
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_args(["stray"])


def test_every_key_is_settable():
    cfg = PretrainConfig()
    for key in leaf_keys():
        parts = key.split(".")
        obj = cfg
        for p in parts:
            obj = getattr(obj, p)  # every listed key exists


@pytest.mark.parametrize("variant", ["skip", "skipless", "skipless_init"])
@pytest.mark.parametrize("optimizer", ["adamw", "soap"])
def test_paper_configs(variant, optimizer):
    cfg = load_yaml(CONFIGS / f"dino_vits16_{variant}_{optimizer}.yaml").validate()
    assert (cfg.model.arch, cfg.model.patch_size, cfg.model.variant) == ("vit_small", 16, variant)
    assert cfg.optim.optimizer == optimizer and cfg.optim.epochs == 300
    assert cfg.data.path is None and cfg.run.keep_epochs == [200, 300]
    # everything else is the published recipe
    ref = PretrainConfig()
    assert cfg.dino == ref.dino and cfg.aug == ref.aug
    assert (cfg.optim.lr, cfg.optim.warmup_epochs, cfg.optim.clip_grad) == (0.0005, 10, 3.0)


@pytest.mark.parametrize("depth", [9, 10, 11])
def test_depth_configs(depth):
    cfg = load_yaml(CONFIGS / f"dino_vits16_skipless_init_adamw_depth{depth}.yaml").validate()
    assert cfg.model.depth == depth and cfg.model.variant == "skipless_init"


def test_quickstart_config_is_small():
    cfg = load_yaml(CONFIGS / "quickstart_cpu.yaml").validate()
    assert cfg.model.arch == "vit_mini" and cfg.data.path is None
    assert cfg.out_dir() == Path("runs/quickstart")


def test_quickstart_differs_from_the_published_recipe_only_where_documented():
    # configs/quickstart_cpu.yaml's comments and the README ("Does the trainer learn?") explain
    # exactly these changes for a CPU; any other drift would be an undocumented method change.
    quick = load_yaml(CONFIGS / "quickstart_cpu.yaml").validate().to_dict()
    ref = PretrainConfig().to_dict()
    changed = {
        (s, k)
        for s in quick
        if isinstance(quick[s], dict)
        for k in quick[s]
        if quick[s][k] != ref[s][k]
    }
    sizes = {("model", "arch"), ("model", "patch_size"), ("aug", "global_size"),
             ("aug", "local_size"), ("aug", "n_local"), ("aug", "blur_sigma"),
             ("dino", "out_dim"), ("dino", "head_hidden_dim"), ("dino", "head_bottleneck_dim"),
             ("data", "batch_size_per_gpu"), ("data", "num_workers"), ("data", "synthetic_size")}  # fmt: skip
    schedule = {("dino", "momentum_teacher"), ("dino", "teacher_temp"),
                ("dino", "warmup_teacher_temp_epochs"), ("optim", "epochs"), ("optim", "lr"),
                ("optim", "min_lr"), ("optim", "warmup_epochs")}  # fmt: skip
    bookkeeping = {("data", "augment_on"), ("monitor", "knn_every"), ("run", "out"),
                   ("run", "precision"), ("run", "cpu_threads"), ("run", "saveckp_freq"),
                   ("run", "keep_epochs")}  # fmt: skip
    assert changed == sizes | schedule | bookkeeping
    # the published starting temperature, the centring and the student side are untouched
    assert quick["dino"]["warmup_teacher_temp"] == 0.04 == quick["dino"]["teacher_temp"]
    assert quick["dino"]["centering"] == "centering" and quick["dino"]["student_temp"] == 0.1


def test_monitor_and_remedy_values_are_range_checked():
    """The #29 keys take their range from their field type like every other (issue 33)."""
    for key, value, want in (
        ("monitor.knn_holdout_fraction", 1.0, "monitor.knn_holdout_fraction must be in [0, 1)"),
        ("monitor.knn_k", 0, "monitor.knn_k must be >= 1, got 0"),
        ("monitor.knn_temperature", 0.0, "monitor.knn_temperature must be > 0"),
        ("monitor.knn_every", -1, "monitor.knn_every must be >= 0"),
        ("dino.koleo_weight", -0.1, "dino.koleo_weight must be >= 0"),
        ("dino.sk_iterations", 0, "dino.sk_iterations must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=re.escape(want)):
            build_config(overrides={key: value})
    build_config(overrides={"monitor.knn_holdout_fraction": 0.0, "monitor.knn_every": 0})
    with pytest.raises(ConfigError, match=re.escape("dino.koleo_features")):
        build_config(overrides={"dino.koleo_features": "cls"})
    assert build_config(overrides={"dino.koleo_features": "bottleneck"}).dino.koleo_features == (
        "bottleneck"
    )


def test_resume_may_change_how_the_monitor_scores_not_what_it_holds_out():
    """The monitor's k, temperature, bank and cadence are bookkeeping; switching it on or off, or
    changing its held-out queries, changes the images pretrained on (``holdout_split``)."""
    saved = PretrainConfig().to_dict()
    scoring = {"monitor.knn_k": 5, "monitor.knn_every": 3, "monitor.knn_bank": 10}
    check_resume_config(saved, build_config(overrides=scoring), 0, 1, "ck")
    for key, value in (
        ("monitor.knn_every", 0),
        ("monitor.knn_holdout", False),
        ("monitor.knn_queries", 10),
        ("dino.koleo_weight", 0.1),
    ):
        with pytest.raises(ResumeError, match=re.escape(f"{key}: checkpoint")):
            check_resume_config(saved, build_config(overrides={key: value}), 0, 1, "ck")
