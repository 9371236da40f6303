"""Figures written into the run dir (matplotlib, headless)."""
from __future__ import annotations

import csv
from pathlib import Path


def loss_curves(metrics_csv, out_png) -> Path | None:
    """Training and validation loss terms per epoch, one panel per term."""
    path = Path(metrics_csv)
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(path)))
    if not rows:
        return None
    epochs = [int(r["epoch"]) for r in rows]
    terms = [t for t in ("loss", "recon", "kl", "label") if any(r.get(t) for r in rows)]
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for prefix, style in (("", "-"), ("val_", "--")):
            ys = [float(r[prefix + term]) if r.get(prefix + term) else float("nan") for r in rows]
            ax.plot(epochs, ys, style, marker="o", ms=3, label="validation" if prefix else "training")
        ax.set_title(term)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
