"""Run an experiment's stages as subprocesses, and reuse what an earlier invocation finished.

Each stage is exactly the command a user would type (``python -m eval.knn ...``), so the
stages stay independent and every intermediate result is on disk. A training stage counts as
finished when its ``summary.json`` says so; it is reused only if its stored config is the
recipe this invocation asks for (``check_reused``), else the page would label its numbers
with the wrong recipe. An evaluation stage is reused (``--reuse-evals``) when its result
file exists.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from ..dino.checkpoint import flat_keys
from ..fileio import portable_path

# Config keys that change what a run learns. Every key outside ``run.`` and ``monitor.`` does;
# of those, only these. The rest say where and how a run logs or is watched (the k-NN monitor
# reads the model and never the training RNG), so a page can be rebuilt with another
# --jacobian-every or monitor setting.
RECIPE_RUN_KEYS = ("run.seed", "run.precision", "run.max_steps", "run.on_nonfinite")
BOOKKEEPING_PREFIXES = ("run.", "monitor.")


def load_json(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_record(run_dir: Path) -> dict:
    lines = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def finished(run_dir: Path, weights: bool = True) -> bool:
    """A training stage ran to its end: its summary.json exists and does not say otherwise,
    and (``weights``) its exported weights are there: the results folder tracks the JSON, not
    the weights, so a stage that evaluates the weights needs a run trained here. A page made
    from the logs alone (the supervised replication's) passes ``weights=False``."""
    summary = Path(run_dir) / "summary.json"
    if not summary.exists() or (weights and not (Path(run_dir) / "backbone.pt").exists()):
        return False
    return bool(load_json(summary).get("finished", True))


def _flat(d: dict) -> dict:
    """Dotted keys; paths as the run's files record them (``portable_path``)."""
    return {k: portable_path(v) if isinstance(v, str) else v for k, v in flat_keys(d).items()}


def recipe_diff(have: dict, want: dict, defaults: dict | None = None) -> list[str]:
    """``key: reused vs requested`` for every recipe key in which a finished run's config
    (``have``) differs from the one this invocation would train (``want``).

    A key absent from ``have`` was added to the config after the run was trained; it is
    compared as its default in ``defaults`` (the config class's), because a new key's default
    keeps the behaviour that existed before it (a run without ``dino.koleo_weight`` trained
    with no KoLeo term, i.e. ``0.0``)."""
    h, w, d = _flat(have), _flat(want), _flat(defaults or {})
    h = {**{k: v for k, v in d.items() if k not in h}, **h}
    keys = [
        k
        for k in sorted(set(h) | set(w))
        if not k.startswith(BOOKKEEPING_PREFIXES) or k in RECIPE_RUN_KEYS
    ]
    return [f"{k}: {h.get(k)!r} vs {w.get(k)!r}" for k in keys if h.get(k) != w.get(k)]


def check_reused(run_dir: Path, have: dict, want: dict, defaults: dict | None = None) -> None:
    """Refuse to reuse a finished run trained with another recipe than the requested one.
    ``defaults``: the config class's (stand for keys added later; DINO's by default)."""
    if defaults is None:
        from ..dino.config import PretrainConfig

        defaults = PretrainConfig().to_dict()
    diff = recipe_diff(have, want, defaults)
    if diff:
        raise SystemExit(
            f"{run_dir} is a finished run of another recipe than this command's ({len(diff)} "
            "keys differ, reused vs requested):\n  "
            + "\n  ".join(diff[:12])
            + "\npass the --config and overrides it was trained with, or another --out"
        )


def run(cmd: list[str], log: Path) -> float:
    """Run one stage, its output to ``log``; on failure show the log's tail (the stage explains
    itself there). Returns the wall time in seconds."""
    t0 = time.perf_counter()
    print("$ " + " ".join(cmd), flush=True)
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        tail = "".join(Path(log).read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"stage failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - t0


class Stages:
    """Runs evaluation stages, reusing results on request, and keeps every stage's wall time
    (a reused stage keeps the time it took in the invocation that made it)."""

    def __init__(self, reuse: bool, previous_timings: dict[str, float] | None = None):
        self.reuse = reuse
        self.previous = dict(previous_timings or {})
        self.timings: dict[str, float] = {}

    def stage(self, key: str, cmd: list[str], log: Path, result: Path) -> None:
        if self.reuse and Path(result).exists():
            print(f"reusing {result}", flush=True)
            self.timings[key] = float(self.previous.get(key, 0.0))
        else:
            self.timings[key] = run(cmd, log)

    def reused(self, key: str, seconds: float | None = None) -> None:
        """A training stage reused or resumed: its time from its own summary, else the last
        invocation's record."""
        self.timings[key] = float(seconds if seconds is not None else self.previous.get(key, 0))
