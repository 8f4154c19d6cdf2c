import io
import random
from argparse import Namespace
from pathlib import PurePosixPath

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_vit

from dino_skipless.dino.checkpoint import ResumeError, load_checkpoint, rng_state, set_rng_state
from dino_skipless.models import CheckpointError, build_model, load_backbone


def _same_output(a, b):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a.forward_features(x), b.forward_features(x), atol=1e-6)


def test_exported_backbone_roundtrip(tmp_path):
    m = tiny_vit("skipless_init", depth=3)
    torch.save(m.state_dict(), tmp_path / "backbone.pt")
    m.spec.to_json(tmp_path / "backbone.json")
    for target in (tmp_path, tmp_path / "backbone.pt"):
        loaded, spec = load_backbone(target)
        assert spec == m.spec and all(not b.skip for b in loaded.blocks)
        assert _same_output(m, loaded)


def test_official_dino_checkpoint_layout(tmp_path):
    """teacher/student dicts with backbone./module. prefixes and DINO-head keys beside them."""
    m = tiny_vit("skip")
    sd = m.state_dict()
    ckpt = {
        "teacher": {
            **{f"backbone.{k}": v for k, v in sd.items()},
            "head.mlp.0.weight": torch.ones(3),
        },
        "student": {f"module.backbone.{k}": v for k, v in sd.items()},
        "args": Namespace(arch="vit_mini", patch_size=8),
        "epoch": 300,
    }
    torch.save(ckpt, tmp_path / "checkpoint0300.pth")
    loaded, spec = load_backbone(tmp_path / "checkpoint0300.pth")
    assert spec.variant == "skip" and spec.depth == 2 and spec.patch_size == 8
    assert _same_output(m, loaded)
    # bare backbone state dict (as the DINO hub weights are distributed)
    torch.save(sd, tmp_path / "dino_vitmini8_pretrain.pth")
    loaded, _ = load_backbone(tmp_path / "dino_vitmini8_pretrain.pth")
    assert _same_output(m, loaded)


def test_timm_state_dict_loads_into_skip_variant(tmp_path):
    ref = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=10, dynamic_img_size=True
    ).eval()
    torch.save(ref.state_dict(), tmp_path / "vit_small_timm.pth")  # includes head.weight/bias
    loaded, spec = load_backbone(tmp_path / "vit_small_timm.pth")
    assert spec.arch == "vit_small" and spec.variant == "skip" and spec.depth == 12
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(loaded.forward_features(x), ref.forward_features(x), atol=1e-5)


def test_wrong_architecture_lists_mismatches(tmp_path):
    m = tiny_vit("skip")
    torch.save(m.state_dict(), tmp_path / "backbone.pt")
    spec = tiny_vit("skip", depth=3).spec
    spec.to_json(tmp_path / "backbone.json")  # claims 3 blocks, weights have 2
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\."):
        load_backbone(tmp_path)
    wide = build_model("vit_tiny", "skip", patch_size=8, img_size=32, depth=2).spec
    wide.to_json(tmp_path / "backbone.json")
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatches: .*attn\.proj\.weight: checkpoint \(128, 128\) vs model \(192, 192\)",
    ):
        load_backbone(tmp_path)


def test_missing_checkpoint_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no backbone.pt"):
        load_backbone(tmp_path)


def test_pos_embed_resampled_for_other_grid(tmp_path):
    src = tiny_vit("skip", img_size=64, depth=1)
    torch.save(src.state_dict(), tmp_path / "backbone.pt")
    spec = tiny_vit("skip", depth=1).spec
    spec.to_json(tmp_path / "backbone.json")
    loaded, _ = load_backbone(tmp_path)
    assert loaded.pos_embed.shape == (1, 1 + 16, 128)
    assert torch.equal(loaded.pos_embed[:, 0], src.pos_embed[:, 0])  # cls position untouched


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears iff the payload ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    m = tiny_vit("skip")
    for name, obj in (
        ("evil.pt", {**m.state_dict(), "x": _Payload(marker)}),
        ("evil_ckpt.pt", {"teacher": m.state_dict(), "args": _Payload(marker)}),
    ):
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match="--trust-checkpoint") as e:
            load_backbone(tmp_path / name)
        assert "refused to load" in str(e.value) and "open" in str(e.value)
        assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is live: plain pickle
    assert marker.exists()  # runs it


def test_training_checkpoint_resume_refuses_payload(tmp_path):

    marker = tmp_path / "pwned"
    torch.save({"student": {}, "meta": {}, "rng": _Payload(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ResumeError, match="refused to load") as e:
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()
    # pretraining has no --trust-checkpoint (its own checkpoints never need it): not offered
    assert "open" in str(e.value) and "--trust-checkpoint" not in str(e.value)


def test_trust_checkpoint_opts_in_to_full_pickle(tmp_path):
    """An object outside the allow-list (here a Path in an otherwise valid state dict wrapper)
    is refused by default and loads only with trust=True."""
    m = tiny_vit("skip")
    torch.save({"model": m.state_dict(), "where": PurePosixPath("/x")}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="pathlib"):
        load_backbone(tmp_path / "w.pt")
    loaded, _ = load_backbone(tmp_path / "w.pt", trust=True)
    assert _same_output(m, loaded)


def test_random_bytes_renamed_pt_is_a_checkpoint_error(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read .*junk.pt"):
        load_backbone(tmp_path / "junk.pt")


def test_rng_state_is_plain_and_roundtrips():
    """Our checkpoints' RNG state needs no allow-listed global (weights_only=True loads it)."""

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)  # no safe_globals: plain lists only
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    # older checkpoints stored numpy's state as the tuple holding a uint32 array
    set_rng_state({**loaded, "numpy": np.random.get_state()})


class _SystemPayload:
    """Unpickling this calls ``os.system`` (module ``posix``): torch >= 2.6 reports it as a
    GLOBAL whose module is blocked, another wording than an unknown global's."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_blocked_module_payload_names_the_global_not_truncation(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({**tiny_vit("skip").state_dict(), "x": _SystemPayload(marker)}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError) as e:
        load_backbone(tmp_path / "e.pt")
    msg = str(e.value)
    assert "truncated" not in msg and "not a .pt" not in msg
    assert "system" in msg and "global" in msg.lower() and "--trust-checkpoint" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    "torch_message, name",
    [
        # torch >= 2.6, a module on the blocklist
        (
            "Weights only load failed. In PyTorch 2.6, we changed the default ...\n\n\n"
            "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.\n",
            "posix.system",
        ),
        # torch 2.4-2.6, any other global
        (
            "Weights only load failed. This file can still be loaded ...\n\tWeightsUnpickler "
            "error: Unsupported global: GLOBAL __main__.Evil was not an allowed global by default.",
            "__main__.Evil",
        ),
        # torch 1.13-2.3
        (
            "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` "
            "will likely succeed, but it can result in arbitrary code execution.Do it only if you "
            "get the file from a trusted source. WeightsUnpickler error: Unsupported class "
            "posix.system",
            "posix.system",
        ),
        (
            "Weights only load failed. ... WeightsUnpickler error: Trying to call reduce for "
            "unrecognized function <built-in function system>",
            "<built-in function system>",
        ),
    ],
)
def test_refused_global_reads_every_torch_wording(torch_message, name):
    from dino_skipless.models.loading import refused_global

    assert refused_global(torch_message) == name
    assert refused_global("PytorchStreamReader failed reading zip archive") is None


def test_export_alone_rebuilds_its_own_network(tmp_path):
    """A skipless_init export copied without backbone.json: the architecture stored in the
    weights file builds the skipless network (it used to load as a residual 'skip' ViT)."""
    from dino_skipless.dino.checkpoint import export_backbone

    m = tiny_vit("skipless_init", depth=3)
    export_backbone(m, tmp_path / "run")
    alone = tmp_path / "copied"
    alone.mkdir()
    (alone / "backbone.pt").write_bytes((tmp_path / "run" / "backbone.pt").read_bytes())
    loaded, spec = load_backbone(alone / "backbone.pt")
    assert spec == m.spec and all(not b.skip for b in loaded.blocks)
    assert _same_output(m, loaded)
    assert load_backbone(tmp_path / "run")[1] == m.spec  # with its backbone.json as before


def test_old_export_without_json_is_refused_with_the_flag_to_pass(tmp_path):
    """A plain state dict named backbone.pt (an export from before the architecture was stored
    in the file) without its backbone.json: the residual switch cannot be read off the weights."""
    m = tiny_vit("skipless_init")
    torch.save(m.state_dict(), tmp_path / "backbone.pt")
    with pytest.raises(CheckpointError, match="--ckpt-variant") as e:
        load_backbone(tmp_path / "backbone.pt")
    assert "backbone.json" in str(e.value)
    loaded, spec = load_backbone(tmp_path / "backbone.pt", variant="skipless_init")
    assert spec.variant == "skipless_init" and _same_output(m, loaded)
    # with the json beside it, an old export loads as before
    m.spec.to_json(tmp_path / "backbone.json")
    assert load_backbone(tmp_path)[1] == m.spec
    with pytest.raises(CheckpointError, match="says variant 'skipless_init'"):
        load_backbone(tmp_path, variant="skip")


def test_json_contradicting_the_stored_architecture_is_refused(tmp_path):
    from dino_skipless.dino.checkpoint import export_backbone

    m = tiny_vit("skipless_init")
    export_backbone(m, tmp_path)
    tiny_vit("skip").spec.to_json(tmp_path / "backbone.json")
    with pytest.raises(CheckpointError, match="variant"):
        load_backbone(tmp_path)


def test_safetensors_metadata_holds_the_architecture(tmp_path):
    import json

    from safetensors.torch import save_file

    m = tiny_vit("skipless")
    save_file(
        {k: v.contiguous() for k, v in m.state_dict().items()},
        tmp_path / "backbone.safetensors",
        metadata={"backbone_spec": json.dumps(m.spec.to_dict())},
    )
    loaded, spec = load_backbone(tmp_path)
    assert spec == m.spec and _same_output(m, loaded)


def test_loaded_checkpoint_records_the_file_and_its_hash(tmp_path):
    import hashlib

    from dino_skipless.dino.checkpoint import export_backbone

    path = export_backbone(tiny_vit("skip"), tmp_path)
    loaded, _ = load_backbone(tmp_path)
    assert loaded.checkpoint_source["path"] == str(path.resolve())
    assert loaded.checkpoint_source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_names_ckpt_variant_and_honours_it(tmp_path):
    """Every evaluation CLI takes --ckpt-variant (add_backbone_args); the refusal of an old
    export without its json names it, in one line and no traceback."""
    import json

    from eval import knn

    m = tiny_vit("skipless_init")
    torch.save(m.state_dict(), tmp_path / "backbone.pt")
    argv = [
        "--dataset", "synthetic", "--root", str(tmp_path / "syn"), "--synthetic-n", "12",
        "--synthetic-size", "32", "--ckpt", str(tmp_path / "backbone.pt"),
        "--resize", "32", "--crop", "32", "--num-workers", "0", "--k", "3",
        "--out", str(tmp_path / "knn"), "--quiet",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        knn.main(argv)
    assert "--ckpt-variant" in str(e.value.code) and "Traceback" not in str(e.value.code)
    assert knn.main([*argv, "--ckpt-variant", "skipless_init"]) == 0
    res = json.loads((tmp_path / "knn" / "results.json").read_text())
    assert (
        res["label"].endswith("(skipless_init)") and res["backbone"]["variant"] == "skipless_init"
    )
