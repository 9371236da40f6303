"""Label-review speed at atlas scale: `bigatlas review` of every labelled cell (label_review.review).

A latent of `--cells` cells (`--classes` Gaussian clusters in `--dims` dimensions; a `--noise` share of the
labels moved to another class) is reviewed once as `bigatlas review` does it, and its inverted-file
partition is built both ways side by side: limited (at most label_review.MAX_PARTITION_CELLS partition
cells, k-means fitted on label_review.FIT_POINTS cells, every cell then assigned) and as a reference index is
built (one partition cell per 256 cells, k-means on all of them). Reported: seconds of each, their ratio, the
recall of the 15 nearest neighbours against the exact search (for a sample of cells) with either partition,
and the review's recall / precision of the moved labels.

    python -m bench.review                      # 1,000,000 cells; bench/results/review.json
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import main, write_results

SAMPLE = 2000  # cells whose neighbours are compared with the exact search


def add_arguments(p) -> None:
    p.add_argument("--cells", type=int, default=1_000_000, help="cells reviewed")
    p.add_argument("--dims", type=int, default=16, help="latent dimensions")
    p.add_argument("--classes", type=int, default=40, help="labelled classes (Gaussian clusters)")
    p.add_argument("--noise", type=float, default=0.05, help="share of labels moved to another class")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="latent and label seed")
    p.add_argument("--out", default="bench/results/review.json", help="JSON result file")


def _recall(index, z, exact) -> float:
    import torch

    got = index.search(torch.as_tensor(z[:SAMPLE]), exact.shape[1] + 1)[1].numpy()
    return round(float(np.mean([len(set(g) & set(e)) / len(e) for g, e in zip(got[:, 1:], exact)])), 4)


def run(a) -> dict:
    import pandas as pd
    import torch

    from bigatlas import label_review
    from bigatlas.knn import LatentIndex
    from bigatlas.metrics import K_SMALL

    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    centres = rng.normal(0, 3, (a.classes, a.dims)).astype(np.float32)
    truth = rng.integers(0, a.classes, a.cells)
    z = centres[truth] + rng.normal(0, 1, (a.cells, a.dims)).astype(np.float32)
    moved = rng.random(a.cells) < a.noise
    given = np.where(moved, (truth + rng.integers(1, a.classes, a.cells)) % a.classes, truth)
    labels = pd.Categorical.from_codes(given, [f"type_{i}" for i in range(a.classes)])

    t = time.perf_counter()
    table = label_review.review(z, labels)
    review_s = time.perf_counter() - t
    flagged = table.flagged.to_numpy()

    exact = LatentIndex(z).search(torch.as_tensor(z[:SAMPLE]), K_SMALL + 1)[1].numpy()[:, 1:]
    row = {"cells": a.cells, "dims": a.dims, "classes": a.classes, "noise": a.noise, "threads": a.threads}
    for name, kwargs in (
        ("limited", {"max_cells": label_review.MAX_PARTITION_CELLS, "fit_points": label_review.FIT_POINTS}),
        ("reference_style", {}),
    ):
        t = time.perf_counter()
        clusters, centroids = LatentIndex.partition(z, **kwargs)
        row[f"partition_seconds_{name}"] = round(time.perf_counter() - t, 1)
        row[f"partition_cells_{name}"] = len(centroids)
        row[f"neighbour_recall_{name}"] = _recall(LatentIndex(z, clusters, centroids), z, exact)
    row["partition_ratio"] = round(row["partition_seconds_reference_style"] / row["partition_seconds_limited"], 1)
    row["review_seconds"] = round(review_s, 1)
    row["review_cells_per_second"] = round(a.cells / review_s)
    row["flagged"] = int(flagged.sum())
    row["review_recall"] = round(float(flagged[moved].mean()), 4)
    row["review_precision"] = round(float(moved[flagged].mean()), 4) if flagged.any() else None
    return write_results({"setup": vars(a), "rows": [row]}, a.out)


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
