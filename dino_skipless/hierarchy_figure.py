"""The hierarchy stage's figure: one CKA heatmap per model side by side (patch tokens above, CLS
below, one colour scale 0-1; a debiased CKA below 0, which only noise gives, shows as 0), then
the per-block curves of every model on shared axes (CKA of each block's output with its input,
k-NN top-1, probe mIoU: the panels whose numbers exist).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .fileio import atomic_write_with  # noqa: E402

KIND_TITLES = {"patch": "patch tokens", "cls": "CLS token"}


def _ticks(labels: list[str], most: int = 7) -> list[int]:
    step = max(1, int(np.ceil(len(labels) / most)))
    return list(range(0, len(labels), step))


def hierarchy_figure(models: Sequence[dict], paths: Sequence[str | Path], dpi: int = 150):
    """Draw ``models`` (records of ``hierarchy_eval.evaluate_model``, with ``label``) into every
    path of ``paths`` (format from the suffix). Returns the paths written."""
    n = len(models)
    curves = ["cka"]
    if any(m.get("knn") for m in models):
        curves.append("knn")
    if any(m.get("probe") for m in models):
        curves.append("probe")
    cell = 2.6
    width = max(n, len(curves)) * cell + 0.8
    fig = plt.figure(figsize=(width, 2 * cell + 2.4), dpi=dpi)
    outer = fig.add_gridspec(2, 1, height_ratios=[2 * cell, 2.0], hspace=0.35)
    maps = outer[0].subgridspec(2, n, wspace=0.35, hspace=0.35)
    colors = plt.get_cmap("tab10")
    image = None
    try:
        for j, m in enumerate(models):
            for r, kind in enumerate(("patch", "cls")):
                rec = m["cka"][kind]
                ax = fig.add_subplot(maps[r, j])
                mat = np.asarray(rec["matrix"], dtype=float)
                image = ax.imshow(mat, vmin=0, vmax=1, cmap="magma", interpolation="nearest")
                labels = rec["depths"]
                ticks = _ticks(labels)
                ax.set_xticks(ticks, [labels[t] for t in ticks], fontsize=6)
                ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=6)
                if r == 0:
                    ax.set_title(m["label"], fontsize=8)
                if j == 0:
                    ax.set_ylabel(f"CKA, {KIND_TITLES[kind]}", fontsize=7)
        if image is not None:
            fig.colorbar(image, ax=fig.axes, shrink=0.5, pad=0.02).ax.tick_params(labelsize=6)
        panels = outer[1].subgridspec(1, len(curves), wspace=0.3)
        axes = [fig.add_subplot(panels[0, 0])]
        axes += [fig.add_subplot(panels[0, i], sharex=axes[0]) for i in range(1, len(curves))]
        for j, m in enumerate(models):
            c = colors(j % 10)
            for ax, what in zip(axes, curves):
                if what == "cka":
                    adj_p = m["cka"]["patch"]["adjacent"]
                    adj_c = m["cka"]["cls"]["adjacent"]
                    ax.plot(range(len(adj_p)), adj_p, "-o", ms=2.5, color=c, label=m["label"])
                    ax.plot(range(1, len(adj_c) + 1), adj_c, "--x", ms=3, color=c, lw=1)
                elif m.get(what):
                    ys = m[what]["top1" if what == "knn" else "miou"]
                    ax.plot(range(len(ys)), ys, "-o", ms=2.5, color=c)
        titles = {
            "cka": "CKA of each block's output\nwith its input (—: patch, --: CLS)",
            "knn": "k-NN top-1 (%), CLS of each block",
            "probe": "linear-probe mIoU (%), each block",
        }
        for ax, what in zip(axes, curves):
            ax.set_title(titles[what], fontsize=7)
            ax.set_xlabel("block", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6, loc="lower left")
        written = []
        for p in paths:
            p = Path(p)
            fmt = p.suffix.lower().lstrip(".")
            meta = {"CreationDate": None} if fmt == "pdf" else None
            atomic_write_with(
                p, lambda f, fmt=fmt, meta=meta: fig.savefig(
                    f, format=fmt, dpi=dpi, metadata=meta, bbox_inches="tight"
                )
            )  # fmt: skip
            written.append(str(p))
    finally:
        plt.close(fig)
    return written
