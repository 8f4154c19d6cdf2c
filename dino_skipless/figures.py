"""Paper-style image grids (matplotlib, Agg backend): rows of equally sized pictures, titled columns.

Layout is computed in inches, not by matplotlib's layout engines, so the output size is exact
and reproducible: ``width_px = round(width_in * dpi)``. Columns can be grouped (e.g. one group per
model); groups are separated by a wider gap. Output bytes depend only on the inputs and the
matplotlib version (PDF creation dates are suppressed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


@dataclass(frozen=True)
class GridStyle:
    cell_in: float = 1.2  # side of one picture
    gap_in: float = 0.03  # between pictures
    group_gap_in: float = 0.12  # between column groups (models)
    margin_in: float = 0.04
    title_pt: float = 7.5
    subtitle_pt: float = 6.5
    dpi: int = 200


@dataclass
class GridInfo:
    n_rows: int
    n_cols: int
    width_px: int
    height_px: int
    paths: list[str] = field(default_factory=list)


def _as_uint8(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid(
    cells: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    out: str | Path | Sequence[str | Path],
    *,
    subtitles: Sequence[str] | None = None,
    groups: Sequence[int] | None = None,
    style: GridStyle = GridStyle(),
) -> GridInfo:
    """Draw ``cells[row][col]`` (HxWx3, uint8 or float in [0, 1]) with one title per column.

    ``groups[col]``: group id of each column; a change of id inserts the wider gap. ``out``: one
    path or several (e.g. PNG and PDF); the format follows each suffix.
    """
    n_rows = len(cells)
    n_cols = len(titles)
    if n_rows == 0 or any(len(r) != n_cols for r in cells):
        raise ValueError(f"every row needs {n_cols} pictures (one per title)")
    groups = list(groups) if groups is not None else [0] * n_cols
    subtitles = list(subtitles) if subtitles is not None else None
    s = style
    lines = 1 + (subtitles is not None and any(subtitles))
    title_in = (s.title_pt + (lines - 1) * s.subtitle_pt) * 1.35 / 72 + 0.06
    xs, x = [], s.margin_in
    for c in range(n_cols):
        if c > 0:
            x += s.group_gap_in if groups[c] != groups[c - 1] else s.gap_in
        xs.append(x)
        x += s.cell_in
    width = x + s.margin_in
    height = s.margin_in + title_in + n_rows * s.cell_in + (n_rows - 1) * s.gap_in + s.margin_in
    # Snap the figure to whole pixels so the reported size is exactly what is written.
    width_px, height_px = round(width * s.dpi), round(height * s.dpi)
    width, height = width_px / s.dpi, height_px / s.dpi

    fig = plt.figure(figsize=(width, height), dpi=s.dpi)
    try:
        for r, row in enumerate(cells):
            top = s.margin_in + title_in + r * (s.cell_in + s.gap_in)
            for c, img in enumerate(row):
                ax = fig.add_axes(
                    (xs[c] / width, 1 - (top + s.cell_in) / height, s.cell_in / width,
                     s.cell_in / height)
                )  # fmt: skip
                ax.imshow(_as_uint8(img), interpolation="nearest", resample=False)
                ax.set_axis_off()
                if r == 0:
                    title = titles[c]
                    if subtitles is not None and subtitles[c]:
                        ax.text(
                            0.5, 1.0 + 0.03, subtitles[c], transform=ax.transAxes,
                            ha="center", va="bottom", fontsize=s.subtitle_pt, color="0.35",
                        )  # fmt: skip
                    # Same pad in every column so all titles share one baseline.
                    pad = s.subtitle_pt * 1.35 + 2 if lines > 1 else 2
                    ax.set_title(title, fontsize=s.title_pt, pad=pad)
        paths = [out] if isinstance(out, (str, Path)) else list(out)
        written = []
        for p in paths:
            p = Path(p)
            p.parent.mkdir(parents=True, exist_ok=True)
            meta = {"CreationDate": None} if p.suffix.lower() == ".pdf" else None
            fig.savefig(p, dpi=s.dpi, metadata=meta)
            written.append(str(p))
    finally:
        plt.close(fig)
    return GridInfo(n_rows, n_cols, width_px, height_px, written)
