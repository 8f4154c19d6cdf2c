"""Issue 33 (points 12, 13): a table of bad arguments and files run through every command line.

Each case must end with exit status 1 and one or two lines on stderr that name what was wrong
(and, for a number, its valid range), with no traceback, and must leave nothing in its
``--out``: every case fails before any work. The table runs in-process (a main's
``SystemExit("msg")`` is what Python turns into "msg" on stderr and status 1); two cases also
run as real processes to check that translation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_BACKBONE_ARGS
from PIL import Image

from dino_skipless import classify, jacobian, pca, pretrain, supervised
from dino_skipless.data import check as data_check
from dino_skipless.data import synthetic as data_synthetic
from eval import compare as lp_compare
from eval import knn, linprobe
from tokencut import compare as tc_compare
from tokencut import run as tc_run

RANDOM = ["--random-init", "skip", *TINY_BACKBONE_ARGS, "--device", "cpu"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Bad inputs: a file where a folder belongs, configs that are no mapping, results that are
    damaged or another stage's, a one-class image folder."""
    d = tmp_path_factory.mktemp("bad")
    (d / "file").write_text("not a folder\n")
    (d / "list.yaml").write_text("- optim\n- lr\n")
    (d / "string.yaml").write_text("just a string\n")
    (d / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (d / "garbage").mkdir()
    (d / "garbage" / "results.json").write_text('{"per_image": [1, 2')
    (d / "garbage" / "per_image_counts.npz").write_bytes(b"PK\x03\x04 not a zip")
    (d / "jsonlist").mkdir()
    (d / "jsonlist" / "results.json").write_text("[1, 2, 3]\n")
    (d / "probe").mkdir()  # an eval.linprobe --out (the layout of its results.json)
    (d / "probe" / "results.json").write_text(json.dumps({"probe": "single", "miou": 10.0}))
    one = d / "oneclass" / "cats"
    one.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(one / f"{i}.png")
    return d


def cases(b: Path, out: Path) -> list[tuple]:
    """``(id, main, argv, what stderr must contain)``; ``out`` is each case's --out."""
    f = b / "file"
    syn = ["--dataset", "synthetic", "--synthetic-n", "4", "--synthetic-size", "32"]
    knn_args = ["--dataset", "synthetic", *RANDOM]
    return [
        # pretraining: --out, --config, values out of range or of the wrong type
        ("pretrain-out-file", pretrain.main, ["--out", str(f)], "a file is in the way"),
        ("pretrain-yaml-list", pretrain.main, ["--config", str(b / "list.yaml"), "--out", str(out)], "expected a YAML mapping"),
        ("pretrain-yaml-str", pretrain.main, ["--config", str(b / "string.yaml"), "--out", str(out)], "got a str"),
        ("pretrain-yaml-bin", pretrain.main, ["--config", str(b / "binary.yaml"), "--out", str(out)], "not a text file"),
        ("pretrain-n-local", pretrain.main, ["--out", str(out), "aug.n_local=-2"], "aug.n_local must be >= 0, got -2"),
        ("pretrain-lr-neg", pretrain.main, ["--out", str(out), "optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
        ("pretrain-lr-abc", pretrain.main, ["--out", str(out), "optim.lr=abc"], "optim.lr: expected float, got 'abc'"),
        ("pretrain-teacher-temp", pretrain.main, ["--out", str(out), "dino.teacher_temp=0"], "dino.teacher_temp must be > 0"),
        ("pretrain-prob", pretrain.main, ["--out", str(out), "data.max_bad_fraction=2"], "must be in [0, 1]"),
        ("pretrain-no-data", pretrain.main, ["--out", str(out), "--data", str(b / "nowhere")], "no such folder"),
        ("pretrain-resume-none", pretrain.main, ["--out", str(out), "--resume"], "no checkpoint at"),
        # supervised ceiling
        ("sup-lr-abc", supervised.main, ["--task", "cls", "--out", str(out), "optim.lr=abc"], "expected float"),
        ("sup-lr-neg", supervised.main, ["--task", "cls", "--out", str(out), "optim.lr=-1"], "optim.lr must be > 0"),
        ("sup-not-kv", supervised.main, ["--task", "cls", "--out", str(out), "lr"], "key=value"),
        ("sup-yaml-list", supervised.main, ["--task", "cls", "--config", str(b / "list.yaml"), "--out", str(out)], "YAML mapping"),
        ("sup-out-file", supervised.main, ["--task", "cls", "--out", str(f)], "a file is in the way"),
        ("sup-seg-n", supervised.main, ["--task", "seg", "--out", str(out), "--seg-n", "0"], "--seg-n: must be >= 1"),
        # supervised classifier (paper Sec. 6.1)
        ("cls-lr-neg", classify.main, ["--out", str(out), "optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
        ("cls-lr-nan", classify.main, ["--out", str(out), "optim.lr=nan"], "optim.lr must be > 0, got nan"),
        ("cls-lr-abc", classify.main, ["--out", str(out), "optim.lr=abc"], "optim.lr: expected float, got 'abc'"),
        ("cls-mixup-prob", classify.main, ["--out", str(out), "mixup.prob=2"], "mixup.prob must be in [0, 1]"),
        ("cls-crop-pct", classify.main, ["--out", str(out), "eval.crop_pct=0"], "eval.crop_pct must be in (0, 1]"),
        ("cls-alpha-inf", classify.main, ["--out", str(out), "model.alpha=inf"], "model.alpha must be a finite number"),
        ("cls-yaml-list", classify.main, ["--config", str(b / "list.yaml"), "--out", str(out)], "YAML mapping"),
        ("cls-out-file", classify.main, ["--out", str(f), "model.depth=1"], "a file is in the way"),
        # k-NN
        ("knn-batch", knn.main, [*knn_args, "--batch-size", "0", "--out", str(out)], "--batch-size: must be >= 1, got '0'"),
        ("knn-k-neg", knn.main, [*knn_args, "--k", "-5", "--out", str(out)], "--k: must be >= 1, got '-5'"),
        ("knn-k-zero", knn.main, [*knn_args, "--k", "20", "0", "--out", str(out)], "--k: must be >= 1"),
        ("knn-temp", knn.main, [*knn_args, "--temperature", "0", "--out", str(out)], "--temperature: must be > 0"),
        ("knn-temp-nan", knn.main, [*knn_args, "--temperature", "nan", "--out", str(out)], "must be > 0, got 'nan'"),
        ("knn-val", knn.main, [*knn_args, "--val-fraction", "1", "--out", str(out)], "must be in (0, 1)"),
        ("knn-k-type", knn.main, [*knn_args, "--k", "ten", "--out", str(out)], "expected an integer >= 1"),
        ("knn-out-file", knn.main, [*knn_args, "--out", str(f)], "a file is in the way"),
        ("knn-one-class", knn.main, ["--root", str(b / "oneclass"), *RANDOM, "--crop", "32", "--resize", "32", "--out", str(out)], "at least 2 classes"),
        # linear probe
        ("lp-batch", linprobe.main, [*syn, *RANDOM, "--batch-size", "0", "--out", str(out)], "--batch-size: must be >= 1"),
        ("lp-epochs", linprobe.main, [*syn, *RANDOM, "--epochs", "0", "--out", str(out)], "--epochs: must be >= 1"),
        ("lp-lrs", linprobe.main, [*syn, *RANDOM, "--lrs", "0.1", "-1", "--out", str(out)], "--lrs: must be > 0"),
        ("lp-out-file", linprobe.main, [*syn, *RANDOM, "--out", str(f / "sub")], "a file is in the way"),
        # TokenCut
        ("tc-eps", tc_run.main, [*syn, *RANDOM, "--eps", "-1", "--out", str(out)], "--eps: must be in (0, 1)"),
        ("tc-tau-nan", tc_run.main, [*syn, *RANDOM, "--tau", "nan", "--out", str(out)], "--tau: must be in [-1, 1)"),
        ("tc-batch", tc_run.main, [*syn, *RANDOM, "--batch-size", "0", "--out", str(out)], "--batch-size: must be >= 1"),
        ("tc-out-file", tc_run.main, [*syn, *RANDOM, "--out", str(f)], "a file is in the way"),
        ("tc-into-probe", tc_run.main, [*syn, *RANDOM, "--out", str(b / "probe")], "results of eval.linprobe"),
        ("tcc-garbage", tc_compare.main, [str(b / "garbage"), str(b / "garbage"), "--out", str(out / "c")], "not a readable results.json"),
        ("tcc-probe", tc_compare.main, [str(b / "probe"), str(b / "probe"), "--out", str(out / "c")], "written by eval.linprobe"),
        ("tcc-list", tc_compare.main, [str(b / "jsonlist"), str(b / "jsonlist"), "--out", str(out / "c")], "not written by tokencut.run"),
        ("tcc-out-file", tc_compare.main, [str(b / "probe"), str(b / "probe"), "--out", str(f / "c")], "a file is in the way"),
        ("lpc-garbage", lp_compare.main, [str(b / "garbage"), str(b / "garbage"), "--out", str(out / "c")], "not a per_image_counts.npz"),
        ("lpc-boot", lp_compare.main, [str(b / "garbage"), str(b / "garbage"), "--n-boot", "0"], "--n-boot: must be >= 1"),
        # PCA figures, Jacobian, data tools
        ("pca-n", pca.main, [*RANDOM, "--dataset", "synthetic", "--n", "0", "--out", str(out / "p.png")], "--n: must be >= 1"),
        ("pca-out-file", pca.main, [*RANDOM, "--dataset", "synthetic", "--out", str(f / "p.png")], "a file is in the way"),
        ("jac-tokens", jacobian.main, ["--tokens", "0", "--out", str(out)], "--tokens: must be >= 1"),
        ("jac-c", jacobian.main, ["--c", "0", "--out", str(out)], "--c: must be > 0"),
        ("jac-out-file", jacobian.main, ["--arch", "vit_mini", "--depth", "1", "--out", str(f)], "a file is in the way"),
        ("syn-size", data_synthetic.main, ["--out", str(out), "--format", "voc", "--size", "8"], "--size: must be >= 16"),
        ("syn-out-file", data_synthetic.main, ["--out", str(f), "--format", "voc", "--n", "1", "--size", "16"], "a file is in the way"),
        ("check-tolerate", data_check.main, ["--dataset", "voc", "--root", str(out), "--tolerate", "-1"], "--tolerate: must be >= 0"),
        ("check-json-dir", data_check.main, ["--dataset", "voc", "--root", str(out), "--json", str(b)], "is a folder"),
    ]  # fmt: skip


def run_in_process(main, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) as the process would have them."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # what the interpreter does with SystemExit("message")
        return 1, err + code + "\n"
    return int(code or 0), err


CASES = cases(Path("B"), Path("OUT"))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_input_exits_1_with_a_short_message_and_writes_nothing(i, bad, tmp_path, capsys):
    out = tmp_path / "out"
    name, main, argv, want = cases(bad, out)[i]
    before = sorted(p.name for p in bad.rglob("*"))
    status, err = run_in_process(main, argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 1, (name, status, err)
    assert 1 <= len(lines) <= 2, (name, err)
    assert "Traceback" not in err and 'File "' not in err, (name, err)
    assert want in err, (name, want, err)
    assert not out.exists() or not any(out.iterdir()), (name, sorted(out.rglob("*")))
    assert sorted(p.name for p in bad.rglob("*")) == before, name  # no lock or report left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_fails_before_the_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        status, err = run_in_process(
            knn.main, ["--dataset", "synthetic", *RANDOM, "--out", str(ro)], capsys
        )
    finally:
        ro.chmod(0o755)
    assert status == 1 and "not writable" in err and len(err.splitlines()) <= 2, err


def test_a_real_process_exits_1_with_the_message_on_stderr(tmp_path):
    """The in-process table relies on Python printing SystemExit's message and exiting 1."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv, want in (
        (["-m", "eval.knn", "--k", "0"], "error: argument --k: must be >= 1, got '0'"),
        (["-m", "dino_skipless.pretrain", "optim.lr=-1"], "error: optim.lr must be > 0"),
    ):
        p = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        assert p.returncode == 1 and want in p.stderr, (argv, p.returncode, p.stderr)
        assert len(p.stderr.strip().splitlines()) <= 2 and "Traceback" not in p.stderr
        assert list(tmp_path.iterdir()) == []
