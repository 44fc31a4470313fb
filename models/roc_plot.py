"""ROC curves of every finding in one figure (``roc.png`` of ``kgdx evaluate``).

Drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so it works
headless and from worker threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from models.metrics import auroc


def plot_roc(
    probs: Any,
    labels: Any,
    mask: Any | None,
    names: Sequence[str],
    path: str | Path,
    title: str = "ROC curves",
    dpi: int = 120,
) -> Path:
    """Write one ROC curve per finding (known labels only) with its AUROC in the legend.

    Findings with a single class among their known labels are listed as undefined in the
    legend, without a curve.

    Shapes:
        probs, labels, mask: ``(N, K)``; names: ``K``.

    Returns:
        the written path (parent folders are created).
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    m = np.ones_like(y) if mask is None else np.asarray(mask, dtype=np.float64)
    if p.ndim == 1:
        p, y, m = p[:, None], y[:, None], m[:, None]
    if not (p.shape == y.shape == m.shape) or p.ndim != 2 or p.shape[1] != len(names):
        raise ValueError(
            f"probs, labels, mask must be (N, {len(names)}), got {p.shape}, {y.shape}, {m.shape}"
        )
    fig = Figure(figsize=(7, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # ten distinct colours, then the same colours dashed: 15 findings stay tellable apart
    colours = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(names))]
    styles = ["-" if i < 10 else "--" for i in range(len(names))]
    for k, name in enumerate(names):
        rows = m[:, k] > 0
        yk, pk = y[rows, k], p[rows, k]
        value = auroc(pk, yk) if rows.any() else None
        n_pos = int(yk.sum())
        if value is None:
            ax.plot(
                [], [], color=colours[k], ls=styles[k], label=f"{name}: undefined (n_pos={n_pos})"
            )
            continue
        fpr, tpr, _ = roc_curve(yk, pk)
        ax.plot(
            fpr,
            tpr,
            color=colours[k],
            ls=styles[k],
            lw=1.4,
            label=f"{name}: {value:.3f} (n_pos={n_pos})",
        )
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7, title="AUROC", title_fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
