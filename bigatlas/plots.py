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
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
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


def _save(fig, out_png, title: str = "") -> Path:
    """Suptitle (if any), tight layout, PNG at 110 dpi, figure closed."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    _plt().close(fig)
    return Path(out_png)


def _legend(ax, categories, colours) -> None:
    """A marker legend right of the panel, up to 30 categories."""
    if len(categories) <= 30:
        handles = [_plt().Line2D([], [], marker="o", ls="", color=c, ms=5) for c in colours]
        ax.legend(handles, list(categories), fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)


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
        _legend(ax, cat.categories, cols)
    return _save(fig, out_png, title)


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


def reliability_diagram(table: list[tuple[float, float, int]], out_png, title: str = "") -> Path:
    """Accuracy against mean confidence per confidence bin (calibration.reliability), bar width ∝ cells."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    if table:
        conf, acc, n = (np.asarray(v, float) for v in zip(*table))
        ax.scatter(conf, acc, s=20 + 200 * n / n.max(), alpha=0.7, label="bins (area: cells)")
        ax.plot(conf, acc, lw=1)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def reference_map(ref_xy, query_xy, pred: pd.Categorical, uncertainty: np.ndarray, out_png, title: str = "") -> Path:
    """Query cells on the reference UMAP: reference in grey, query on top coloured by prediction and by
    uncertainty."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    size = float(np.clip(6e4 / max(len(query_xy), 1), 0.5, 12))
    ref_size = float(np.clip(6e4 / max(len(ref_xy), 1), 0.3, 8))
    for ax in axes:
        ax.scatter(ref_xy[:, 0], ref_xy[:, 1], c="#d9d9d9", s=ref_size, linewidths=0, rasterized=True)
        ax.set_xticks([])
        ax.set_yticks([])
    pred = pd.Categorical(pred)
    cols = _colours(len(pred.categories))
    codes = np.asarray(pred.codes)
    rgba = np.where(codes[:, None] >= 0, cols[np.maximum(codes, 0)], (0.2, 0.2, 0.2, 1.0))
    axes[0].scatter(query_xy[:, 0], query_xy[:, 1], c=rgba, s=size, linewidths=0, rasterized=True)
    axes[0].set_title("query: prediction")
    _legend(axes[0], pred.categories, cols)
    im = axes[1].scatter(query_xy[:, 0], query_xy[:, 1], c=uncertainty, cmap="magma_r", vmin=0, vmax=1, s=size,
                         linewidths=0, rasterized=True)  # fmt: skip
    axes[1].set_title("query: uncertainty")
    fig.colorbar(im, ax=axes[1], fraction=0.04)
    return _save(fig, out_png, title)
