"""Load backbone weights from every checkpoint flavour the evaluation stages accept.

Accepted by :func:`load_backbone` (and so by ``--ckpt`` of every stage):

* our export: ``backbone.pt`` (a dict of the state dict and the ``BackboneSpec`` that rebuilds
  it: arch, variant, depth, patch size; ``backbone.json`` beside it is the same spec, for
  reading, and must agree) or the folder holding it; ``backbone.safetensors`` with the spec in
  its metadata (``backbone_spec``) or in ``backbone.json``. Older exports (a plain state dict)
  load with their ``backbone.json``; without it the variant cannot be known (a skipless
  network's weights look like a residual one's) and the load is refused unless
  ``--ckpt-variant`` names it;
* our training checkpoint ``checkpoint.pt`` (its ``teacher`` is used, spec from ``meta``;
  a supervised run's: its ``model``'s backbone);
* an official DINO checkpoint (``teacher``/``student`` dicts, ``module.``/``backbone.``
  prefixes; ``args`` give arch and patch size) or a bare DINO backbone state dict;
* a timm ViT state dict (classifier ``head.*`` dropped; pos-embed resampled if its grid differs).

External checkpoints carry no variant: they are residual ViTs, so they load as ``skip`` (or as
``--ckpt-variant``). Anything that does not fit fails with the missing, unexpected and
mis-shaped keys listed -- never a silent half-load. The file is read once, and the sha256 of
those bytes travels with the model (``checkpoint_source``): caches are keyed on it.

Unpickling runs code, so ``.pt`` files are read with ``torch.load(weights_only=True)``: tensors,
containers and numbers, plus exactly :data:`SAFE_GLOBALS` (the ``argparse.Namespace`` of the
official DINO checkpoints, and the numpy arrays of the numpy RNG state in our older
checkpoints; newer ones store it as plain lists). Anything else is refused with a
:class:`CheckpointError` naming the global the file needs (:func:`refused_global` reads every
torch version's wording) unless ``trust=True`` (``--trust-checkpoint``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import pickle
import re
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed

from .vit import ARCHS, BackboneSpec, build_vit, check_variant

# Heads cannot be read off weights; published ViTs use 64-dim heads except ours (vit_mini).
_WIDTH_TO_ARCH = {v["embed_dim"]: k for k, v in ARCHS.items()}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the requested backbone."""


class CheckpointRefused(CheckpointError):
    """The safe loader refused a global the file needs (``name``); ``--trust-checkpoint`` would
    unpickle it."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message)
        self.name = name


def _numpy_rng_globals() -> list:
    import numpy as np

    try:  # numpy >= 2 pickles arrays through numpy._core, older numpy through numpy.core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover
        from numpy.core.multiarray import _reconstruct
    # _reconstruct only builds an empty array of an allowed class (ndarray); the data is
    # restored by ndarray.__setstate__ from bytes, so these three cannot run foreign code.
    return [_reconstruct, np.ndarray, np.dtype]


# Everything outside plain tensors/containers that an accepted checkpoint may hold.
SAFE_GLOBALS = [argparse.Namespace, *_numpy_rng_globals()]
TRUST_HELP = (
    "load --ckpt/--resume files with full pickle, which can run code stored in the file: only "
    "for files you trust (needed only for checkpoints holding objects other than tensors, "
    "containers, numbers, argparse.Namespace and numpy arrays)"
)


# How each torch version words a refused global (``torch/_weights_only_unpickler.py``): torch >=
# 2.6 for a module on its blocklist (os, subprocess, ...), 2.4+ for any other global, 1.13-2.3,
# and a REDUCE of a function the unpickler does not know.
_REFUSED_GLOBAL = (
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked", re.IGNORECASE),
    re.compile(r"Unsupported global: GLOBAL (\S+)"),
    re.compile(r"Unsupported class (\S+)"),
    re.compile(r"reduce for unrecognized function (.+?)\s*$", re.MULTILINE),
)
# The prefix of every refusal by ``torch.load(weights_only=True)`` (as opposed to a damaged file).
_SAFE_LOADER_REFUSAL = "Weights only load failed"


def refused_global(message: str) -> str | None:
    """The global (``module.name``) that ``torch.load(weights_only=True)``'s error says it
    refused, in the wording of any torch version since 1.13; None for other errors."""
    for pattern in _REFUSED_GLOBAL:
        found = pattern.search(message)
        if found:
            return found.group(1).rstrip(".")
    return None


def _unpickler_reason(message: str) -> str:
    """The line of a weights-only refusal that says what was refused (not torch's preamble)."""
    tail = message.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if "WeightsUnpickler error:" not in message:
        lines = lines[1:] or lines  # torch's first line is its preamble
    return (lines[0] if lines else message.strip())[:200]


def _torch_load(source, name: str | Path, trust: bool):
    if trust:
        return torch.load(source, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        msg = str(e)
        first = (msg.strip().splitlines() or [type(e).__name__])[0][:200]
        found = refused_global(msg)
        if found:
            raise CheckpointRefused(
                f"refused to load {name}: it needs the global {found}, which is not allowed "
                "(unpickling it could run code stored in the file; a checkpoint may hold only "
                "tensors, containers, numbers, argparse.Namespace and numpy arrays); if you "
                "trust the file, pass --trust-checkpoint",
                found,
            ) from None
        if _SAFE_LOADER_REFUSAL in msg:  # junk bytes, or a pickle opcode it does not take
            raise CheckpointError(
                f"cannot read {name} as a PyTorch checkpoint (truncated, or not a .pt file?): "
                f"the safe loader says: {_unpickler_reason(msg)} (for a file you trust, "
                "--trust-checkpoint reads it with full pickle)"
            ) from None
        raise CheckpointError(
            f"cannot read {name} as a PyTorch checkpoint (truncated, or not a .pt file?): {first}"
        ) from None


def safe_torch_load(path: str | Path, trust: bool = False):
    """``torch.load`` that executes nothing from the file unless ``trust``; a refusal names the
    global the file needs and ``--trust-checkpoint``."""
    return _torch_load(path, path, trust)


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(module\.)?(_orig_mod\.)?(backbone\.)?", "", k)
        out[k] = v
    return out


def _backbone_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DINO-head and classifier entries, keep the backbone's."""
    sd = {k: v for k, v in sd.items() if not k.startswith(("module.head.", "head."))}
    return _strip_prefixes(sd)


def infer_spec(sd: dict[str, torch.Tensor], variant: str = "skip") -> BackboneSpec:
    """Read width, depth and patch size off a ViT state dict."""
    try:
        embed_dim = int(sd["cls_token"].shape[-1])
        patch = int(sd["patch_embed.proj.weight"].shape[-1])
    except KeyError as e:
        raise CheckpointError(
            f"not a ViT backbone state dict: key {e} missing (have e.g. {sorted(sd)[:8]})"
        ) from None
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    arch = _WIDTH_TO_ARCH.get(embed_dim)
    if arch is None:
        raise CheckpointError(
            f"cannot tell the number of heads of a width-{embed_dim} ViT; known widths: "
            f"{ {v['embed_dim']: k for k, v in ARCHS.items()} }"
        )
    n_pos = int(sd["pos_embed"].shape[1]) - 1
    grid = int(round(n_pos**0.5))
    return BackboneSpec(
        arch=arch, variant=variant, patch_size=patch, img_size=grid * patch, depth=depth
    )


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str):
    """Load or raise with every missing, unexpected and mis-shaped key listed."""
    own = model.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        old = sd["pos_embed"]
        if old.shape[-1] == own["pos_embed"].shape[-1]:
            n_old, n_new = old.shape[1] - 1, own["pos_embed"].shape[1] - 1
            g_old, g_new = int(round(n_old**0.5)), int(round(n_new**0.5))
            if g_old * g_old == n_old and g_new * g_new == n_new:
                sd = dict(sd)
                sd["pos_embed"] = resample_abs_pos_embed(
                    old, new_size=(g_new, g_new), old_size=(g_old, g_old), num_prefix_tokens=1
                )
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(sd))
        if sd[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not match the backbone {model.spec}:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                shown = ", ".join(items[:20]) + (
                    f", ... ({len(items)} in all)" if len(items) > 20 else ""
                )
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(sd, strict=True)
    return model


# Our export (``export_payload``): the weights and the spec that rebuilds their network, in one
# file, so that a ``backbone.pt`` copied without its ``backbone.json`` still builds the right
# network (a skipless model's weights cannot tell it from a residual one).
EXPORT_FORMAT = "dino_skipless.backbone"
EXPORT_VERSION = 1
SPEC_KEY = "backbone_spec"  # the .pt dict's key, and the safetensors metadata key (JSON text)
# Spec fields that decide the network a state dict is loaded into.
NETWORK_FIELDS = ("arch", "variant", "patch_size", "depth", "embed_dim", "num_heads", "mlp_ratio")
NETWORK_FIELDS += ("qkv_bias",)
VARIANT_FLAG = "--ckpt-variant"


def export_payload(backbone: torch.nn.Module) -> dict:
    """What ``backbone.pt`` holds: the unprefixed state dict and the ``BackboneSpec`` dict
    (plain containers and numbers: it loads with ``weights_only=True``)."""
    sd = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        SPEC_KEY: backbone.spec.to_dict(),
        "state_dict": sd,
    }


def _safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file (header: u64 length, then JSON)."""
    try:
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        return {}


def _read_weights(path: Path, trust: bool = False) -> tuple[object, str, dict]:
    """(loaded object, sha256 of the bytes it was loaded from, safetensors metadata). Read
    once, so the hash is that of what was loaded even if the file is replaced meanwhile."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    sha = hashlib.sha256(data).hexdigest()
    if path.suffix == ".safetensors":
        from safetensors.torch import load

        try:
            return load(data), sha, _safetensors_metadata(data)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
    return _torch_load(io.BytesIO(data), path, trust), sha, {}


def _spec_from_dino_args(args, sd, variant: str) -> BackboneSpec:
    """Official DINO saves ``args`` (a Namespace) with ``arch`` and ``patch_size``."""
    spec = infer_spec(sd, variant)
    arch = getattr(args, "arch", None)
    if isinstance(arch, str) and arch in ARCHS:
        spec = BackboneSpec.from_dict({**spec.to_dict(), "arch": arch, "num_heads": None})
    return spec


def _spec_from(d, where: str) -> BackboneSpec:
    try:
        if isinstance(d, str):
            d = json.loads(d)
        return BackboneSpec.from_dict(d)
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON, unknown arch/variant
        raise CheckpointError(f"{where}: not a valid backbone spec: {e}") from None


def _check_variant(spec: BackboneSpec, variant: str | None, where: str) -> BackboneSpec:
    if variant is not None and variant != spec.variant:
        raise CheckpointError(
            f"{where} says variant {spec.variant!r}, not {variant!r}: drop {VARIANT_FLAG} (it is "
            "only for weights that do not say what network they are)"
        )
    return spec


def _check_sidecar(spec: BackboneSpec, sidecar: Path) -> None:
    """A ``backbone.json`` beside a file that stores its own spec must agree with it."""
    if not sidecar.exists():
        return
    other = _spec_from(sidecar.read_text(), f"{sidecar} (the backbone spec beside the weights)")
    a, b = spec.to_dict(), other.to_dict()
    diffs = [f"{k}: file {a[k]!r} vs json {b[k]!r}" for k in NETWORK_FIELDS if a[k] != b[k]]
    if diffs:
        raise CheckpointError(
            f"{sidecar} describes another network than the one stored in "
            f"{sidecar.with_suffix('.pt').name} ({'; '.join(diffs)}); the weights file is the "
            "truth: delete or fix the json"
        )


def _bare_spec(sd, path: Path, sidecar: Path, variant: str | None) -> tuple[BackboneSpec, str]:
    """Spec of a plain state dict: its ``backbone.json``, the variant the user named, or for
    external weights (timm, DINO hub files) a residual ViT. A plain ``backbone*.pt`` is one of
    our older exports, whose variant only its json knew: refused rather than guessed."""
    if sidecar.exists():
        spec = _spec_from(sidecar.read_text(), f"{sidecar} (the backbone spec beside {path.name})")
        return _check_variant(spec, variant, str(sidecar)), "exported backbone (spec from json)"
    if variant is not None:
        kind = f"bare ViT state dict (variant {variant} from {VARIANT_FLAG})"
        return infer_spec(sd, variant), kind
    if path.stem.startswith("backbone"):
        raise CheckpointError(
            f"{path} holds weights without their architecture (an export from before it was "
            f"stored in the file) and {sidecar.name} is not beside it: whether the network has "
            f"residual connections cannot be read off the weights. Put its {sidecar.name} back, "
            f"or pass {VARIANT_FLAG} skip|skipless|skipless_init (width, depth and patch size "
            "are read from the weights)"
        )
    return infer_spec(sd), "bare ViT state dict (assumed residual: variant skip)"


def _find_weights(path: Path) -> Path:
    if path.is_dir():
        for name in ("backbone.safetensors", "backbone.pt", "checkpoint.pt"):
            if (path / name).exists():
                return path / name
        raise CheckpointError(
            f"no backbone.pt, backbone.safetensors or checkpoint.pt in folder {path}"
        )
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def resolve_checkpoint(
    path: str | Path, trust: bool = False, variant: str | None = None
) -> tuple[dict[str, torch.Tensor], BackboneSpec, str, dict]:
    """``(backbone_state_dict, spec, kind, source)`` for any accepted checkpoint; ``source``
    is the file actually read and the sha256 of its bytes. ``variant``: the network of weights
    that do not say (``--ckpt-variant``); refused where the file says another."""
    if variant is not None:
        check_variant(variant)
    path = _find_weights(Path(path))
    obj, sha, metadata = _read_weights(path, trust)
    source = {"path": str(path.resolve()), "sha256": sha}
    sidecar = path.with_suffix(".json")
    if isinstance(obj, dict) and "teacher" in obj:
        sd = _backbone_keys(obj["teacher"])
        meta = obj.get("meta") or {}
        if "backbone" in meta:
            spec = _check_variant(_spec_from(meta["backbone"], str(path)), variant, str(path))
            return sd, spec, "training checkpoint (teacher)", source
        spec = _spec_from_dino_args(obj.get("args"), sd, variant or "skip")
        return sd, spec, "official DINO checkpoint (teacher)", source
    stored = None
    if isinstance(obj, dict) and SPEC_KEY in obj:
        stored = obj[SPEC_KEY]
    elif SPEC_KEY in metadata:
        stored = metadata[SPEC_KEY]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        meta = obj.get("meta") or {}
        if "backbone" in meta:  # our supervised trainer's checkpoint (classifier.trainer)
            spec = BackboneSpec.from_dict(meta["backbone"])
            return _backbone_keys(obj["model"]), spec, "training checkpoint (classifier)"
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (type {type(obj).__name__})")
    sd = _backbone_keys(obj)
    if stored is not None:
        spec = _check_variant(_spec_from(stored, f"{path} ({SPEC_KEY})"), variant, str(path))
        _check_sidecar(spec, sidecar)
        return sd, spec, "exported backbone", source
    spec, kind = _bare_spec(sd, path, sidecar, variant)
    return sd, spec, kind, source


def load_backbone(
    path: str | Path,
    expect: BackboneSpec | None = None,
    trust: bool = False,
    variant: str | None = None,
) -> tuple[torch.nn.Module, BackboneSpec]:
    """Build the backbone a checkpoint describes and load its weights (eval mode, CPU).

    ``expect``: if given, the checkpoint must fit this spec (e.g. an official DINO checkpoint
    loaded into a model the user named), else the error lists what differs. ``trust``: unpickle
    with full pickle (``--trust-checkpoint``); see :func:`safe_torch_load`. ``variant``: the
    network of a plain state dict (``--ckpt-variant``). The model carries ``checkpoint_kind``
    and ``checkpoint_source`` (the file read and its sha256: what a cache is keyed on).
    """
    sd, spec, kind, source = resolve_checkpoint(path, trust, variant)
    if expect is not None:
        spec = expect
    model = build_vit(spec, seed=None, init_weights=False)
    load_state_dict_strict(model, sd, f"{path} ({kind})")
    model.eval()
    model.checkpoint_kind = kind
    model.checkpoint_source = source
    return model, spec
