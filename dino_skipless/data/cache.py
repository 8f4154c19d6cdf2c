"""Generate-once cache of synthetic datasets (the generator is ``generate.py``; the command line
``synthetic.py`` is not imported by the package, so ``python -m`` runs a fresh module)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..fileio import current_umask
from .generate import DEFAULT_N, DEFAULT_SIZE, FORMATS, generate, manifest_matches


def cache_key(fmt: str, n: int, size: int, seed: int, vary: bool = False) -> str:
    return f"{fmt}_n{n}_s{size}_seed{seed}" + ("_vary" if vary else "")


def default_cache_dir() -> Path:
    base = os.environ.get("SKIPLESS_CACHE") or Path.home() / ".cache" / "skipless_dino"
    return Path(base) / "synthetic"


def synthetic_root(
    fmt: str,
    n: int = DEFAULT_N,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    *,
    vary: bool = False,
) -> Path:
    """Root of a cached synthetic dataset, generated on first use.

    Lives in ``cache_dir/<fmt>_n<n>_s<size>_seed<seed>`` (default cache dir:
    ``$SKIPLESS_CACHE/synthetic`` or ``~/.cache/skipless_dino/synthetic``). It is written into a
    temporary sibling and renamed into place, so a killed run never leaves a partial dataset and
    concurrent callers agree on one copy. A copy made by another generator version is replaced.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return cached_generation(
        cache_key(fmt, n, size, seed, vary),
        lambda root: manifest_matches(root, fmt, n, size, seed, vary),
        lambda root: generate(root, fmt, n, size, seed, vary=vary, keep_truth=False),
        cache_dir,
    )


def cached_generation(
    name: str,
    matches: Callable[[Path], bool],
    make: Callable[[Path], object],
    cache_dir: str | Path | None = None,
) -> Path:
    """``cache_dir/name``, made by ``make(tmp)`` unless ``matches`` says a complete copy is there.

    Written into a temporary sibling and renamed into place, so a killed run never leaves a
    partial dataset and concurrent callers agree on one copy; a copy that does not match (another
    generator version) is replaced."""
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = parent / name
    if matches(final):
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the cache from colleagues
    try:
        make(tmp)
        if final.exists() and not matches(final):
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=parent))
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not matches(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
