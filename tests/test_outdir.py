"""Issue 33, points 9 and 10: one run per output folder (a lock with the holder's PID and start
time, taken over from a dead run, released on every exit), and no stage replacing another's
results or export."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE_ARGS, tiny_vit

from dino_skipless import supervised
from dino_skipless.data import synthetic_root
from dino_skipless.outdir import (
    LOCK_NAME,
    OutDirError,
    check_report_owner,
    claim_out_dir,
    report_stage,
)
from eval import linprobe

REPO = Path(__file__).resolve().parents[1]
HOLDER = (
    "import sys, time\n"
    "from dino_skipless.outdir import claim_out_dir\n"
    "held = claim_out_dir(sys.argv[1], 'eval.knn')\n"
    "held.__enter__()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


@contextlib.contextmanager
def holder_process(out: Path):
    """Another process holding ``out`` (until this context ends, killed with SIGKILL)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_second_run_is_refused_with_the_holders_pid_and_start_time(tmp_path, capsys):
    """Two pretrainings had interleaved log.jsonl and two probes both printed "wrote": now the
    second run into a held folder is refused, naming the holder. The holder is another process,
    killed with SIGKILL: the kernel drops its lock, and the next run takes the folder over."""
    out = tmp_path / "run"
    with holder_process(out) as holder:
        with pytest.raises(OutDirError) as e:
            with claim_out_dir(out, "eval.linprobe"):
                pass
        msg = str(e.value)
        assert f"in use by PID {holder.pid}" in msg and "started 20" in msg and "UTC" in msg
        assert "-c" in msg  # the holder's command line
    assert (out / LOCK_NAME).exists()  # a killed run cannot clean up ...
    with claim_out_dir(out, "eval.knn"):  # ... but its lock died with it
        held = json.loads((out / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["stage"] == "eval.knn"
    assert f"took over the lock that PID {holder.pid}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    stale = {"pid": dead.pid, "host": "h", "started": "2026-01-01 00:00:00 UTC", "command": "x"}
    (out / LOCK_NAME).write_text(json.dumps(stale))
    with claim_out_dir(out, "eval.knn"):
        pass
    assert f"PID {dead.pid} on h, started 2026-01-01" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_the_lock_is_released_on_errors_and_empty_folders_are_removed(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with claim_out_dir(out, "eval.knn"):
            assert (out / LOCK_NAME).is_file()
            with pytest.raises(OutDirError, match="in use by PID"):  # even by this process
                with claim_out_dir(out, "eval.knn"):
                    pass
            raise RuntimeError("the stage failed")
    assert not (tmp_path / "a").exists()  # created by the claim, left empty: removed
    with claim_out_dir(out, "eval.knn"):
        (out / "results.json").write_text('{"stage": "eval.knn"}')
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_reports_name_their_stage_and_another_stages_report_is_kept(tmp_path):
    assert report_stage({"stage": "tokencut.run", "miou": 1}) == "tokencut.run"
    # files written before the key existed
    assert report_stage({"probe": "single", "miou": 3.0}) == "eval.linprobe"
    assert report_stage({"top1": 50.0}) == "eval.knn"
    assert report_stage({"corloc": 20.0}) == "tokencut.run"
    assert report_stage([1, 2]) is None
    rep = tmp_path / "results.json"
    rep.write_text(json.dumps({"miou": 3.0}))
    check_report_owner(rep, "eval.linprobe")  # a rerun replaces its own results
    with pytest.raises(OutDirError, match="results of eval.linprobe; tokencut.run would"):
        check_report_owner(rep, "tokencut.run")
    rep.write_text("not json")
    with pytest.raises(OutDirError, match="no stage of this project wrote"):
        check_report_owner(rep, "eval.knn")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return synthetic_root("voc", n=12, size=64, seed=0, cache_dir=tmp_path_factory.mktemp("syn"))


def test_sweep_of_two_runs_with_one_name_writes_two_folders(synth_root, tmp_path):
    """``--sweep-ckpts a/run b/run`` wrote both into run_skipless_init/: the first was lost."""
    for name, seed in (("a", 1), ("b", 2)):
        d = tmp_path / name / "run"
        d.mkdir(parents=True)
        m = tiny_vit(seed=seed, img_size=None)
        torch.save(m.state_dict(), d / "backbone.pt")
        m.spec.to_json(d / "backbone.json")
    out = tmp_path / "sweep"
    argv = [
        "--dataset", "voc", "--root", str(synth_root), "--sweep-ckpts", str(tmp_path / "a" / "run"),
        str(tmp_path / "b" / "run"), *TINY_BACKBONE_ARGS, "--resolution", "64", "--epochs", "1",
        "--lrs", "0.1", "--bootstrap", "0", "--num-workers", "0", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert linprobe.main(argv) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    labels = [r["ckpt"] for r in sweep["rows"]]
    assert labels == ["a/run (skipless_init)", "b/run (skipless_init)"]
    assert sweep["folders"] == {labels[0]: "a_run_skipless_init", labels[1]: "b_run_skipless_init"}
    got = {
        json.loads((out / f / "results.json").read_text())["checkpoint"]["path"]
        for f in sweep["folders"].values()
    }
    # each folder holds its own run's probe (the path names the weights file loaded, #33a)
    assert {Path(g).relative_to(tmp_path.resolve()).parts[0] for g in got} == {"a", "b"}


def test_supervised_refuses_to_replace_an_earlier_export(tmp_path):
    """Pretraining refuses a fresh run over a checkpoint; the supervised ceiling silently
    replaced the backbone.pt of an earlier run in the same --out."""
    out = tmp_path / "sup"
    out.mkdir()
    (out / "backbone.pt").write_bytes(b"an earlier export")
    with pytest.raises(SystemExit, match="backbone.pt exists"):
        supervised.main(["--task", "cls", "--out", str(out)])
    assert (out / "backbone.pt").read_bytes() == b"an earlier export"
    assert sorted(p.name for p in out.iterdir()) == ["backbone.pt"]


def test_classify_refuses_a_folder_another_run_holds(tmp_path):
    """The supervised trainer (#30) takes the same lock as every other stage: a second run into
    a held --out is refused before it reads an image, naming the holder."""
    from dino_skipless import classify

    out = tmp_path / "cls"
    with holder_process(out) as holder:
        with pytest.raises(SystemExit, match=f"in use by PID {holder.pid}"):
            classify.main(["--out", str(out), "model.arch=vit_mini", "model.depth=1"])
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
