"""Figures (matplotlib, headless): loss curves, library sizes, UMAP panels, confusion matrix."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(metrics_csv, out_png) -> Path | None:
    """Training and validation loss terms per epoch, one panel per term."""
    path = Path(metrics_csv)
    if not path.exists():
        return None
    rows = list(csv.DictReader(open(path)))
    if not rows:
        return None
    plt = _plt()
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


def library_size(counts: np.ndarray, edges: np.ndarray, n_cells: int, out_png) -> Path:
    """Histogram of counts per cell (cells per bin between consecutive `edges`), log x axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.stairs(counts, edges)
    ax.set_xscale("log")
    ax.set_xlabel("counts per cell")
    ax.set_ylabel("cells")
    ax.set_title(f"library size ({n_cells} cells)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def _colours(n: int) -> np.ndarray:
    plt = _plt()
    if n <= 10:
        return plt.get_cmap("tab10")(np.arange(n))
    if n <= 20:
        return plt.get_cmap("tab20")(np.arange(n))
    return plt.get_cmap("gist_ncar")(np.linspace(0.02, 0.95, n))


def umap_panels(xy: np.ndarray, panels: dict[str, pd.Categorical], out_png, title: str = "") -> Path:
    """One scatter per categorical colouring of the same 2-D layout; legends up to 30 categories."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    order = np.random.default_rng(0).permutation(len(xy))  # no category painted over the others
    size = float(np.clip(6e4 / max(len(xy), 1), 0.5, 12))
    for ax, (name, cat) in zip(axes[0], panels.items()):
        cat = pd.Categorical(cat)
        cols = _colours(len(cat.categories))
        codes = np.asarray(cat.codes)
        rgba = np.where(codes[:, None] >= 0, cols[np.maximum(codes, 0)], (0.8, 0.8, 0.8, 1.0))
        ax.scatter(xy[order, 0], xy[order, 1], c=rgba[order], s=size, linewidths=0, rasterized=True)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        if len(cat.categories) <= 30:
            handles = [plt.Line2D([], [], marker="o", ls="", color=c, ms=5) for c in cols]
            ax.legend(
                handles, list(cat.categories), fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False
            )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def confusion_matrix(conf: pd.DataFrame, out_png, title: str = "") -> Path:
    """Row-normalised confusion (true rows × predicted columns), columns restricted to those used."""
    plt = _plt()
    used = conf.columns[(conf.to_numpy().sum(0) > 0) | conf.columns.isin(conf.index)]
    m = conf[used].to_numpy(dtype=float)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    side = 2.5 + 0.28 * max(m.shape)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    if max(m.shape) <= 60:
        ax.set_xticks(range(len(used)), list(used), rotation=90, fontsize=7)
        ax.set_yticks(range(len(conf.index)), list(conf.index), fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
