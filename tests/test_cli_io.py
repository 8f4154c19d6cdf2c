"""Output files are written atomically with the permissions ``open()`` would give."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dino_skipless.data import synthetic_root
from dino_skipless.dino.checkpoint import atomic_torch_save
from dino_skipless.fileio import command_line, portable_path, write_json


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_respect_the_umask(tmp_path, umask, mask):
    umask(mask)
    write_json(tmp_path / "r.json", {"a": 1})
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "c.pt")
    with open(tmp_path / "ref.txt", "w") as f:  # what a plain open() makes
        f.write("x")
    want = stat.S_IMODE(os.stat(tmp_path / "ref.txt").st_mode)
    assert want == 0o666 & ~mask
    for name in ("r.json", "c.pt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == want, name
    assert not list(tmp_path.glob(".*.tmp"))


def test_synthetic_cache_folder_respects_the_umask(tmp_path, umask):

    umask(0o022)
    root = synthetic_root("imagefolder", n=2, size=16, seed=0, cache_dir=tmp_path)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755


def test_command_line_is_a_relative_python_m_command(monkeypatch, tmp_path):

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "argv", [str(repo / "eval" / "knn.py"), "--out", "runs/x"])
    assert command_line() == "python -m eval.knn --out runs/x"
    monkeypatch.setattr(sys, "argv", [str(repo / "dino_skipless" / "dino" / "config.py")])
    assert command_line() == "python -m dino_skipless.dino.config"
    monkeypatch.chdir(repo)
    monkeypatch.setattr(sys, "argv", [str(repo / "scripts" / "replicate_small.py"), "--quick"])
    assert command_line() == "python scripts/replicate_small.py --quick"


def _committable(results: Path) -> list[Path]:
    """The files under results/ that git tracks or would add (not the ignored ones: a run's
    config.yaml may hold the machine's --data path and is ignored for that reason)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "."],
            cwd=results, capture_output=True, check=True,
        ).stdout.decode()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file counts
        return [p for p in results.rglob("*") if p.is_file()]
    return [results / name for name in out.split("\0") if name]


def test_tracked_results_record_no_absolute_paths():
    results = Path(__file__).resolve().parents[1] / "results"
    pattern = re.compile(r"(?<![\w.~])/(root|home|work|tmp|Users|private)/")
    bad = [
        str(p.relative_to(results))
        for p in _committable(results)
        if p.suffix in {".json", ".md", ".txt", ".yaml", ".jsonl"} and pattern.search(p.read_text())
    ]
    assert not bad, f"absolute machine paths in {bad[:5]}"


def test_write_json_records_paths_portably(tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    home = Path.home()
    assert portable_path(str(tmp_path / "runs" / "a")) == "runs/a"
    assert portable_path(str(tmp_path)) == "."
    assert portable_path("runs/a") == "runs/a"  # already relative
    assert portable_path("/opt/data/voc") == "/opt/data/voc"  # neither cwd nor home: kept
    if not str(tmp_path).startswith(str(home)):
        assert portable_path(str(home / ".cache" / "x")) == "~/.cache/x"
    write_json(tmp_path / "r.json", {"root": tmp_path / "d", "runs": [str(tmp_path / "e")], "n": 3})
    assert json.loads((tmp_path / "r.json").read_text()) == {"root": "d", "runs": ["e"], "n": 3}
    # a synthetic set under a relocated cache is named through the variable that relocates it
    monkeypatch.setenv("SKIPLESS_CACHE", "/opt/cache")
    assert portable_path("/opt/cache/synthetic/voc_n4") == "$SKIPLESS_CACHE/synthetic/voc_n4"
    assert portable_path("/opt/cached") == "/opt/cached"  # a sibling is not inside it
    assert portable_path(str(tmp_path / "runs" / "a")) == "runs/a"
