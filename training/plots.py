"""PNG plots of the evaluation report (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from app.core.config import DEFAULT_FP_PER_IMAGE


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def crop_grid(samples: Sequence[tuple], path: Path) -> Path:
    """image / predicted mask / crop box (green) / fracture boxes (red), 4 per row."""
    plt = pyplot()
    cols = 4
    rows = -(-len(samples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (grey, mask, box, boxes) in zip(axes.flat, samples, strict=False):
        h, w = grey.shape
        ax.imshow(grey, cmap="gray")
        ax.imshow(np.ma.masked_where(~mask, mask), alpha=0.3, cmap="autumn")
        _rect(ax, box, "lime")
        for b in boxes:
            _rect(ax, b * np.array([w, h, w, h]), "red")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _rect(ax, box, colour: str, label: str | None = None) -> None:
    import matplotlib.patches as patches

    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(
        patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, lw=1.5)
    )
    if label:
        ax.text(x1, y1, label, color=colour, fontsize=7, va="bottom")


def roc_pr_plots(
    labels: Sequence[int],
    scores: Sequence[float],
    out_dir: Path,
    prefix: str,
    score_name: str | None = None,
) -> None:
    """ROC and PR curves of `scores` into <prefix>_roc.png and <prefix>_pr.png, titled by the
    score they plot (`score_name`, else the prefix)."""
    title = score_name or prefix
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = pyplot()
    y, s = np.asarray(labels), np.asarray(scores)
    if 0 < y.sum() < len(y):
        fpr, tpr, _ = roc_curve(y, s)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"{title} ROC")
        fig.tight_layout()
        fig.savefig(out_dir / f"{prefix}_roc.png", dpi=100)
        plt.close(fig)
        prec, rec, _ = precision_recall_curve(y, s)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(rec, prec)
        ax.set(xlabel="recall", ylabel="precision", title=f"{title} PR")
        fig.tight_layout()
        fig.savefig(out_dir / f"{prefix}_pr.png", dpi=100)
        plt.close(fig)


def confusion_plot(cm: dict, out_dir: Path, prefix: str) -> None:
    plt = pyplot()
    grid = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    fig, ax = plt.subplots(figsize=(3.5, 3.5))
    ax.imshow(grid, cmap="Blues")
    dark = grid.max() / 2  # counts on the dark cells in white, on the light ones in black
    for (i, j), v in np.ndenumerate(grid):
        colour = "white" if v > dark else "black"
        ax.text(j, i, str(v), ha="center", va="center", color=colour, fontsize=12)
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["no fracture", "fracture"],
        yticklabels=["no fracture", "fracture"],
        xlabel="predicted",
        ylabel="true",
        title=prefix,
    )
    fig.tight_layout()
    fig.savefig(out_dir / f"{prefix}_confusion.png", dpi=100)
    plt.close(fig)


def froc_plot(
    fp_per_image: np.ndarray,
    recall: np.ndarray,
    out_dir: Path,
    prefix: str,
    points: Sequence[dict] = (),
) -> None:
    """FROC curve; `points` (operating-point rows: fp_per_image, recall) are marked on it."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.step(fp_per_image, recall, where="post")
    # the rows' labels in a column at the right, each joined to its point by a thin line: five
    # rows between 0.1 and 0.5 FP/image sit too close on the curve to be labelled in place
    marked = sorted(points, key=lambda r: r["recall"])
    for k, row in enumerate(marked):
        x, y = row["achieved_fp_per_image"], row["recall"]
        ax.plot(x, y, "o", color="tab:red", ms=4)
        ax.annotate(
            f"{row['fp_per_image']} FP/image",
            (x, y),
            xytext=(0.98, 0.05 + 0.09 * k),
            textcoords="axes fraction",
            ha="right",
            fontsize=7,
            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "grey"},
        )
    ax.set(
        xscale="symlog",
        xlabel="mean false positives per image",
        ylabel="lesion recall",
        title=f"{prefix} FROC",
        ylim=(0, 1),
    )
    ax.axvline(DEFAULT_FP_PER_IMAGE, ls="--", color="grey")
    fig.tight_layout()
    fig.savefig(out_dir / f"{prefix}_froc.png", dpi=100)
    plt.close(fig)


def detection_grid(samples: Sequence[tuple], path: Path) -> Path:
    """image with ground truth (red) and detections (cyan, with scores), 4 per row. A sample is
    (grey, truth, boxes, scores) and optionally the (width, height) of the frame its boxes are
    in (the image may be a reduced working copy: it is drawn stretched over that frame, so every
    box lands on its region) and a title (the image id)."""
    plt = pyplot()
    cols = 4
    rows = max(1, -(-len(samples) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample in zip(axes.flat, samples, strict=False):
        grey, gt, boxes, scores = sample[:4]
        h, w = grey.shape[:2]
        width, height = sample[4] if len(sample) > 4 and sample[4] else (w, h)
        ax.imshow(grey, cmap="gray", extent=(0, width, height, 0))
        if len(sample) > 5 and sample[5]:
            ax.set_title(str(sample[5]), fontsize=8)
        for b in gt:
            _rect(ax, b, "red")
        for b, s in zip(boxes, scores, strict=True):
            _rect(ax, b, "cyan", f"{s:.2f}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
