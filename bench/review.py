"""Label-review speed at atlas scale: `bigatlas review` of every labelled cell (label_review.review).

A latent of `--cells` cells (`--classes` Gaussian clusters in `--dims` dimensions; a `--noise` share of the
labels moved to another class) is reviewed once as `bigatlas review` does it (label_review.review), and its
inverted-file index is built side by side three ways: two-level (the review's: at most
label_review.MAX_COARSE_CELLS coarse cells fitted on label_review.FIT_POINTS cells, each split into cells of
~256, label_review.PROBE of them scanned per cell), one level limited to 4,096 cells fitted on the same sample
(the review's index before, 4 scanned: its cells grow with the atlas), and as a reference index is built (one
cell per 256 cells, k-means on all of them; up to 1,000,000 cells, beyond that too slow to wait for). Reported
per index: seconds to build, its cells, the seconds to search the neighbours of SEARCHED cells (and the cells/s
that makes), and the recall of the 15 nearest neighbours against the exact search for SAMPLE cells; and the
whole review's seconds, its recall / precision of the moved labels, and the process's peak memory up to the
review's end (the latent and the review).

    python -m bench.review                      # 1,000,000 cells; bench/results/review.json (one row per size)
    python -m bench.review --cells 4000000      # another size: its row replaces that size's

`--recipe` runs the review recipe end to end on the command line instead, on a `--preset` atlas of
`--recipe-cells` whose visible labels are a `--noise` share wrong (bench.quality's sibling-subtype errors):
train without labels, embed, `bigatlas review`, then train with the labels twice, as given and with
`--drop-labels`, and embed both. Reported: seconds per step, the review's recall / precision of the wrong
labels, and per labelled run the accuracy of cell_type_pred against the truth over all cells, over the
cells whose label was wrong, and over the cells without a label (never seen).

    python -m bench.review --recipe             # 100,000 cells of `rare`; bench/results/review_recipe.json
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import main, write_results

SAMPLE = 2000  # cells whose neighbours are compared with the exact search
SEARCHED = 50_000  # cells whose neighbours each index's search is timed on


def add_arguments(p) -> None:
    p.add_argument("--cells", type=int, default=1_000_000, help="cells reviewed")
    p.add_argument("--dims", type=int, default=16, help="latent dimensions")
    p.add_argument("--classes", type=int, default=40, help="labelled classes (Gaussian clusters)")
    p.add_argument("--noise", type=float, default=0.05, help="share of labels moved to another class")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="latent and label seed")
    p.add_argument("--out", default=None, help="JSON result file (default bench/results/review[_recipe].json)")
    p.add_argument("--recipe", action="store_true", help="the review recipe end to end on the command line")
    p.add_argument("--recipe-cells", type=int, default=100_000, help="cells of the recipe's atlas")
    p.add_argument("--genes", type=int, default=1000, help="genes of the recipe's atlas")
    p.add_argument("--preset", default="rare", help="synth preset of the recipe's atlas")
    p.add_argument("--data-dir", default="bench/data", help="where the recipe's atlas is built or reused")


def _exact(z, k: int) -> np.ndarray:
    """The exact k nearest other cells of the first SAMPLE cells, 64 queries at a time (memory: 64 × cells)."""
    import torch

    from bigatlas.knn import LatentIndex

    index = LatentIndex(z, exact=True)
    q = torch.as_tensor(z[:SAMPLE])
    return np.concatenate([index.search(q[lo : lo + 64], k + 1)[1].numpy()[:, 1:] for lo in range(0, len(q), 64)])


def _measure(index, z, exact) -> dict:
    import torch

    q = torch.as_tensor(z[:SEARCHED])
    index.search(q[:100], exact.shape[1] + 1)  # compiled on first use
    t = time.perf_counter()
    got = index.search(q, exact.shape[1] + 1)[1].numpy()
    seconds = time.perf_counter() - t
    recall = np.mean([len(set(g) & set(e)) / len(e) for g, e in zip(got[:SAMPLE, 1:], exact)])
    return {"search_seconds": round(seconds, 2), "search_cells_per_second": round(len(q) / seconds),
            "neighbour_recall": round(float(recall), 4)}  # fmt: skip


def run(a) -> dict:
    if a.recipe:
        return recipe(a)
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
    review_rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # the latent and the review
    flagged = table.flagged.to_numpy()

    exact = _exact(z, K_SMALL)
    row = {"cells": a.cells, "dims": a.dims, "classes": a.classes, "noise": a.noise, "threads": a.threads}
    fit, coarse = label_review.FIT_POINTS, label_review.MAX_COARSE_CELLS
    builds = {
        "two_level": lambda: LatentIndex.partition_two_level(z, max_coarse=coarse, fit_points=fit),
        "one_level": lambda: (*LatentIndex.partition(z, max_cells=4096, fit_points=fit), None),
    }  # fmt: skip
    if a.cells <= 1_000_000:
        builds["reference_style"] = lambda: (*LatentIndex.partition(z), None)
    for name, build in builds.items():
        t = time.perf_counter()
        clusters, centroids, groups = build()
        row[f"partition_seconds_{name}"] = round(time.perf_counter() - t, 1)
        row[f"partition_cells_{name}"] = len(centroids)
        probe = label_review.PROBE if name == "two_level" else 4  # the review's; one level as the review had it
        index = LatentIndex(z, clusters, centroids, groups=groups, probe=probe)
        row.update({f"{key}_{name}": v for key, v in _measure(index, z, exact).items()})
    row["search_ratio_two_level_vs_one_level"] = round(
        row["search_cells_per_second_two_level"] / row["search_cells_per_second_one_level"], 2
    )
    row["review_seconds"] = round(review_s, 1)
    row["review_cells_per_second"] = round(a.cells / review_s)
    row["flagged"] = int(flagged.sum())
    row["review_recall"] = round(float(flagged[moved].mean()), 4)
    row["review_precision"] = round(float(moved[flagged].mean()), 4) if flagged.any() else None
    row["review_peak_rss_gb"] = review_rss
    out = Path(a.out or "bench/results/review.json")
    old = json.loads(out.read_text()) if out.exists() else {"setup": {}, "rows": []}
    rows = sorted([*(r for r in old["rows"] if r["cells"] != a.cells), row], key=lambda r: r["cells"])
    command = "python -m bench.review " + " ".join(sys.argv[1:])
    setup = {k: vars(a)[k] for k in ("dims", "classes", "noise", "threads", "seed")} | {
        "commands": list(dict.fromkeys([*old["setup"].get("commands", []), command.strip()]))
    }
    return write_results({"setup": setup, "rows": rows}, out)


def noisy_atlas(a) -> tuple[Path, np.ndarray]:
    """The recipe's atlas (built on first use): a --noise share of its visible cell_type labels moved to a
    sibling subtype in the store itself; and which cells were moved."""
    import zarr

    from bench.quality import mislabel
    from bigatlas.synth import synth

    path = Path(a.data_dir) / f"review_{a.preset}_{a.recipe_cells}x{a.genes}_s{a.seed}_noise{a.noise}.zarr"
    moved_file = path.with_suffix(".moved.npy")
    if not (path.exists() and moved_file.exists()):
        shutil.rmtree(path, ignore_errors=True)
        synth(path, a.recipe_cells, a.genes, "zarr", seed=a.seed, preset_name=a.preset)
        column = zarr.open_group(str(path), mode="r+")["obs/cell_type"]
        cats = np.array([str(c) for c in column["categories"][:]])
        labels = cats[column["codes"][:]]
        moved = mislabel(labels, labels != "undefined", a.noise, a.seed)
        order = np.argsort(cats)
        column["codes"][:] = order[np.searchsorted(cats, labels, sorter=order)]
        np.save(moved_file, moved)
    return path, np.load(moved_file)


def recipe(a) -> dict:
    import anndata as ad
    import pandas as pd

    data, moved = noisy_atlas(a)
    work = Path(tempfile.mkdtemp(prefix="bench-review-"))
    keys = ["--data", str(data), "--batch-key", "dataset_id", "--covariate-keys", "donor_id"]
    labels = ["--label-keys", "cell_type"]
    steps = {
        "train_unlabelled": ["train", *keys, "--out", str(work / "run0")],
        "embed_unlabelled": ["embed", "--run", str(work / "run0"), "--data", str(data), "--out", str(work / "e0.zarr")],
        "review": ["review", "--emb", str(work / "e0.zarr"), "--label-key", "cell_type", "--out", str(work / "r.csv")],
        "train_labels": ["train", *keys, *labels, "--out", str(work / "plain")],
        "train_dropped": [
            "train",
            *keys,
            *labels,
            "--drop-labels",
            f"cell_type={work / 'r.csv'}",
            "--out",
            str(work / "dropped"),
        ],
    }
    for run in ("plain", "dropped"):
        steps[f"embed_{run}"] = [
            "embed",
            "--run",
            str(work / run),
            "--data",
            str(data),
            "--out",
            str(work / f"{run}.zarr"),
        ]
    seconds = {}
    for name, argv in steps.items():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bigatlas", *argv], check=True, capture_output=True, text=True)
        seconds[name] = round(time.perf_counter() - t, 1)
        print(name, seconds[name], "s", flush=True)
    flagged = np.zeros(len(moved), bool)
    flagged[pd.read_csv(work / "r.csv").row.to_numpy()] = True  # one store, unfiltered: the row is the position
    obs = ad.read_zarr(data).obs
    truth, given = obs.true_cell_type.astype(str).to_numpy(), obs.cell_type.astype(str).to_numpy()
    row = {
        "preset": a.preset, "cells": a.recipe_cells, "genes": a.genes, "noise": a.noise, "seed": a.seed,
        "wrong_labels": int(moved.sum()), "flagged": int(flagged.sum()),
        "review_recall": round(float(flagged[moved].mean()), 4),
        "review_precision": round(float(moved[flagged].mean()), 4) if flagged.any() else None,
        "seconds": seconds,
    }  # fmt: skip
    for run in ("plain", "dropped"):
        pred = ad.read_zarr(work / f"{run}.zarr").obs.cell_type_pred.astype(str).to_numpy()
        right = pred == truth
        row[run] = {
            "accuracy": round(float(right.mean()), 4),
            "accuracy_wrong_labels": round(float(right[moved].mean()), 4),
            "accuracy_unlabelled": round(float(right[given == "undefined"].mean()), 4),
            "epochs": len(pd.read_csv(work / run / "metrics.csv")),
        }
    shutil.rmtree(work, ignore_errors=True)
    keep = ("recipe_cells", "genes", "preset", "noise", "seed", "out")
    setup = {k: v for k, v in vars(a).items() if k in keep} | {
        "command": "python -m bench.review " + " ".join(sys.argv[1:])
    }
    return write_results({"setup": setup, "rows": [row]}, a.out or "bench/results/review_recipe.json")


if __name__ == "__main__":
    main(__doc__, add_arguments, run)
