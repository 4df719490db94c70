"""The run's report: results table (JSON, CSV, Markdown), the privacy–utility plot, before/after grids."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fl_unlearn.data.inspect import tile_rows

#: The paper's Table 1 (4,000 synthetic images), drawn on the plot for comparison.
PAPER_TABLE1 = {
    "Original": {"pir": 15.8, "auc": 0.88, "fid": 53.5},
    "SISS": {"pir": 6.8, "auc": 0.52, "fid": 179.2},
    "KL-Away": {"pir": 7.2, "auc": 0.83, "fid": 84.9},
    "SalUn+KL-Away": {"pir": 9.2, "auc": 0.85, "fid": 81.2},
}

LABELS = {"original": "Original", "siss": "SISS", "kl-away": "KL-Away", "salun-kl-away": "SalUn+KL-Away",
          "ga": "GA", "finetune-remain": "Fine-tune (D_r)", "retrain": "Retrain (D_r)", "real": "Real data"}

COLUMNS = [("method", "method", None), ("Non-Anon", "non_anon", "{:.0f}"), ("UA %", "ua", "{:.1f}"),
           ("UA img %", "ua_image", "{:.1f}"), ("ODA %", "oda", "{:.1f}"), ("PIR %", "pir", "{:.1f}"),
           ("newly exposed", "newly_exposed", "{:.0f}"), ("AUC", "auc", "{:.3f}"), ("AUC 95% CI", "auc_ci", None),
           ("FID", "fid", "{:.1f}"), ("control FP %", "control_fp", "{:.1f}"), ("wall s", "seconds", "{:.1f}"),
           ("hospital-steps", "hospital_steps", "{:.0f}")]


def cell(row: dict, key: str, pattern: str | None) -> str:
    if key == "method":
        return LABELS.get(row["method"], row["method"])
    if key == "auc_ci":
        low, high = row.get("auc_ci_low"), row.get("auc_ci_high")
        return "–" if low is None or pd.isna(low) else f"{low:.3f}–{high:.3f}"
    value = row.get(key)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return pattern.format(value) if pattern else str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, key, pattern) for _, key, pattern in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def privacy_utility_plot(rows: list[dict], fid_name: str) -> bytes:
    """PIR (x) against AUC (y), one point per method, marker area by FID; the paper's rows hollow."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    fids = [r["fid"] for r in rows if r.get("fid") is not None and np.isfinite(r["fid"])]
    scale = 400.0 / max(fids) if fids else 1.0
    for r in rows:
        if r.get("auc") is None or r.get("pir") is None:
            continue
        size = 30 + scale * (r["fid"] if r.get("fid") is not None and np.isfinite(r["fid"]) else 0)
        ax.scatter(r["pir"], r["auc"], s=size, alpha=0.75)
        ax.annotate(LABELS.get(r["method"], r["method"]), (r["pir"], r["auc"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    paper_scale = 400.0 / max(v["fid"] for v in PAPER_TABLE1.values())
    for name, v in PAPER_TABLE1.items():
        ax.scatter(v["pir"], v["auc"], s=30 + paper_scale * v["fid"], facecolors="none", edgecolors="grey")
        ax.annotate(f"paper: {name}", (v["pir"], v["auc"]), textcoords="offset points", xytext=(6, -10),
                    fontsize=7, color="grey")
    ax.set_xlabel("PIR (%): re-identified patients per 100 synthetic images (lower is better)")
    ax.set_ylabel("utility AUC on real held-out patients")
    ax.set_title(f"Privacy vs utility (marker area: {fid_name}; hollow: the paper's Table 1)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def before_after_grid(before: np.ndarray, after: dict[str, np.ndarray], count: int = 8, pad: int = 2) -> np.ndarray:
    """Rows: Original then each method, columns: the same seeds, so image i is comparable down a column."""
    return tile_rows([before[:count], *(images[:count] for images in after.values())], pad)
