"""One self-contained HTML page of an evaluation (figures embedded as PNG data URIs): ROC, PR,
calibration, confusion matrix at the decision threshold, FROC with the operating points, bootstrap
95% intervals, per-region AUROC, the worst false negatives and false positives with their boxes,
and the models' names, versions and sha256."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from training import plots


def calibration_plot(labels: list[int], probs: list[float], out_dir: Path, prefix: str) -> Path:
    """Reliability diagram: mean predicted probability against observed frequency, 10 bins."""
    plt = plots.pyplot()
    y, p = np.asarray(labels, float), np.asarray(probs, float)
    edges = np.linspace(0, 1, 11)
    idx = np.clip(np.digitize(p, edges) - 1, 0, 9)
    xs = [p[idx == b].mean() for b in range(10) if (idx == b).any()]
    ys = [y[idx == b].mean() for b in range(10) if (idx == b).any()]
    ns = [int((idx == b).sum()) for b in range(10) if (idx == b).any()]
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.plot(xs, ys, "o-")
    for x, yy, n in zip(xs, ys, ns, strict=True):
        ax.annotate(str(n), (x, yy), fontsize=7, xytext=(3, -8), textcoords="offset points")
    ax.set(
        xlabel="predicted probability", ylabel="observed frequency", title=f"{prefix} calibration"
    )
    fig.tight_layout()
    path = out_dir / f"{prefix}_calibration.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"


def write_html(report_dir: Path, result: dict[str, Any], title: str) -> Path:
    """report_dir/report.html from an evaluation result and the PNGs already in report_dir."""
    clf, det = result["classifier"], result["detector"]
    ci = result.get("classifier_ci95", {})
    rows = "".join(
        f"<tr><td>{name}</td><td>{clf[key]:.3f}</td><td>{_ci(ci.get(key))}</td></tr>"
        for name, key in (
            ("AUROC", "auroc"),
            ("accuracy", "accuracy"),
            ("sensitivity", "sensitivity"),
            ("specificity", "specificity"),
        )
        if clf.get(key) is not None
    )
    regions = "".join(
        f"<tr><td>{html.escape(r)}</td><td>{v['n']}</td><td>{v['fractured']}</td>"
        f"<td>{_num(v['auroc'])}</td><td>{_ci(v['ci95'])}</td></tr>"
        for r, v in result.get("classifier_by_region", {}).items()
    )
    froc = "".join(
        f"<tr><td>{row['fp_per_image']}</td><td>{row['threshold']:.4f}</td>"
        f"<td>{row['recall']:.3f}</td><td>{row['achieved_fp_per_image']:.3f}</td></tr>"
        for row in det.get("froc_table", [])
    )
    fused = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>"
        for k, v in result.get("fused_image_auroc", {}).items()
        if v is not None
    )
    models = "".join(
        f"<tr><td>{html.escape(role)}</td><td>{html.escape(m['name'])}</td>"
        f"<td>{html.escape(m['version'])}</td><td><code>{html.escape(m['sha256'])}</code></td></tr>"
        for role, m in result.get("model_cards", {}).items()
    )
    served = det.get("at_served_fp_0.4_threshold", {})
    boot = det.get("at_served_fp_0.4_threshold_ci95", {})
    figures = "".join(
        _img(report_dir / name, alt)
        for name, alt in (
            ("classifier_roc.png", "ROC of the fracture probability"),
            ("classifier_pr.png", "precision-recall of the fracture probability"),
            ("classifier_calibration.png", "calibration (reliability) of the probability"),
            (
                "classifier_confusion.png",
                f"confusion matrix at the decision threshold {clf['threshold']:.3f}",
            ),
            ("detector_froc.png", "FROC: lesion recall against false positives per image"),
        )
    )
    gallery = "".join(
        _img(report_dir / name, alt)
        for name, alt in (
            (
                "worst_false_negatives.png",
                "worst false negatives: fractured, lowest probability (red: truth, cyan: detections)",
            ),
            (
                "worst_false_positives.png",
                "worst false positives: not fractured, highest probability",
            ),
        )
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; max-width: 1200px; color: #111; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1.5rem; }}
td, th {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }}
figure {{ display: inline-block; margin: 0.5rem; vertical-align: top; }}
figure img {{ max-width: 560px; border: 1px solid #ddd; }}
figcaption {{ font-size: 0.85rem; color: #444; max-width: 560px; }}
.note {{ color: #555; font-size: 0.9rem; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">{result["n_images"]} images; source shift: {html.escape(str(result.get("shift", "none")))};
intervals are 95% percentile bootstraps over images (1000 resamples). Research use only: not a
medical device, not for primary diagnosis.</p>
<h2>Models</h2>
<table><tr><th>role</th><th>name</th><th>version</th><th>sha256</th></tr>{models}</table>
<h2>Fracture probability (per image)</h2>
<table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>{rows}</table>
<h3>By body region</h3>
<table><tr><th>region</th><th>images</th><th>fractured</th><th>AUROC</th><th>95% CI</th></tr>{regions}</table>
<h3>Image score: classifier fused with the max box score</h3>
<table><tr><th>score</th><th>AUROC</th></tr>{fused}</table>
<h2>Detector</h2>
<p>AP50 {det.get("ap50", float("nan")):.3f}, AP50-95 {det.get("ap50_95", float("nan")):.3f},
{det["n_lesions"]} lesions; at the served fp_per_image=0.4 threshold: lesion recall
{served.get("recall", 0):.3f} (95% CI {_ci(boot.get("recall_ci95"))}),
{served.get("fp_per_image", 0):.3f} false positives per image
(95% CI {_ci(boot.get("fp_per_image_ci95"))}).</p>
<table><tr><th>fp_per_image</th><th>threshold</th><th>lesion recall</th><th>achieved FP/image</th></tr>{froc}</table>
<h2>Figures</h2>{figures}
<h2>Worst cases</h2>{gallery}
</body></html>
"""
    out = report_dir / "report.html"
    out.write_text(page)
    return out
