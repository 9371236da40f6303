"""`bigatlas` console entry point: synth | stream | prepare | train | reference | embed | map-query | evaluate |
review.

Flags come from where their defaults live (flags.py). Only the chosen command's parser is built, so
its modules (torch, scanpy, …) are imported only when it runs.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .config import UNLABELED
from .errors import reported
from .flags import (
    DATA_HELP,
    HelpFormatter,
    add_data,
    add_signature_flags,
    add_train_arguments,
    add_unlabeled,
    data_arg,
    read_gene_list,
    signature_values,
    unlabeled_given,
)


def _train(p):
    add_train_arguments(p)

    def run(a):
        from .train import train_from_args

        train_from_args(a)

    return run


def _synth(p):
    from .synth import PRESETS, SynthSpec, synth

    p.add_argument("--out", default=None, help="output path (.zarr directory or SOMA experiment directory)")
    p.add_argument("out_positional", nargs="?", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cells", type=int, required=True, help="number of cells")
    p.add_argument("--genes", type=int, default=2000, help="number of genes")
    p.add_argument("--format", choices=["zarr", "soma"], default="zarr", help="store format")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--order", choices=["study", "cell_type", "random"], default=SynthSpec.order,
        help="storage order of cells (cell_type = sorted by type, the hard case for shuffling)",
    )  # fmt: skip
    p.add_argument("--studies", type=int, default=SynthSpec.n_studies, help="number of studies (dataset_id)")
    p.add_argument("--donors-per-study", type=int, default=SynthSpec.donors_per_study, help="donors per study")
    p.add_argument("--mean-library", type=float, default=SynthSpec.mean_library, help="mean counts per cell")
    p.add_argument(
        "--preset", choices=list(PRESETS), default="default",
        help="difficulty: subtle (subtypes differing in a few genes, wide libraries, overdispersion), rare "
        "(types under 1%% of cells), condition (a treatment changing some types only; type-specific batch "
        "effects), continuous (graded subtypes and an activation that differs by study), ambient (ambient RNA, "
        "assay depths), tissues (types resident in one tissue's studies only), hard (subtle, rare and condition)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")

    def run(a):
        import time

        out = a.out or a.out_positional
        if not out or (a.out and a.out_positional and a.out != a.out_positional):
            raise ValueError("give the output path once, with --out")
        t = time.perf_counter()
        spec = synth(
            out, a.cells, a.genes, a.format, seed=a.seed, overwrite=a.overwrite, order=a.order, preset_name=a.preset,
            n_studies=a.studies, donors_per_study=a.donors_per_study, mean_library=a.mean_library,
        )  # fmt: skip
        print(
            f"wrote {spec.n_cells} cells x {spec.n_genes} genes ({a.format}) to {out} in {time.perf_counter() - t:.1f}s"
        )

    return run


def _stream(p):
    from .stream_report import stream_report

    add_data(p, DATA_HELP)
    helps = {
        "batch_size": "cells per minibatch",
        "epochs": "epochs to stream",
        "seed": "shuffle seed",
        "workers": "reader threads",
        "obs_filter": ("SOMA value_filter, e.g. \"tissue_general == 'blood'\"", str),
        "obs_keys": "obs columns delivered as codes",
    }
    add_signature_flags(p, stream_report, helps)
    return lambda a: stream_report(data_arg(a), **signature_values(a, helps))


def _embed(p):
    from .infer import embed

    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        help="trained RUN_DIR (--run-dir under torchrun, whose own --run-path swallows --run)",
    )
    add_data(p, "query: " + DATA_HELP)
    p.add_argument(
        "--out", required=True, help="output AnnData-Zarr store (obsm/X_bigatlas, obs/<key>_pred …), or SOMA experiment"
    )
    helps = {
        "chunk_size": "cells per output chunk (resume unit)",
        "batch_size": "cells per forward pass",
        "obs_filter": ("SOMA value_filter on the query cells", str),
        "layer": ("the query's matrix of raw counts: X, raw or a layers/ name (unset: the run's)", str),
        "full_probabilities": "also write obsm/<key>_probabilities",
        "unknown_threshold": "flag <key>_unknown (and 'Unknown' in <key>_pred_filtered) when <key>_uncertainty "
        "is above this",
        "predictor": (
            "labels from: head (calibrated), both (calibrated head + kNN vote) or knn (unset: the reference's "
            "choice per label key, head unless it was built with another; head without a reference)",
            str,
        ),
        "k": ("reference neighbours per kNN vote (unset: the reference's)", int),
        "min_gene_overlap": "refuse a query sharing fewer of the model's genes than this fraction",
        "overwrite": "recompute a complete or different output",
        "allow_non_integer": "accept non-integer values (a model trained with --allow-non-integer accepts them)",
        "out_format": (
            "zarr or soma (unset: an existing output's, else what --out's name ends in, .zarr or .soma, else the "
            "query's: SOMA for a SOMA query, Zarr otherwise; a SOMA output of other data is indexed by store row)",
            str,
        ),
    }
    add_signature_flags(p, embed, helps)
    return lambda a: embed(a.run, data_arg(a), a.out, **signature_values(a, helps))


def _reference(p):
    from .reference_build import build_reference

    p.add_argument("--run", "--run-dir", dest="run", required=True, help="trained RUN_DIR")
    p.add_argument("--data", nargs="+", default=None, help="the data the run was trained on (default: its own)")
    helps = {
        "max_cells": "training cells in the index (label-stratified)",
        "umap": "lay the index out with UMAP (for X_umap_ref)",
        "k": "neighbours per kNN vote",
        "predictor": "embed's default predictor: head (the calibrated label head), both (head + kNN mean), knn, "
        "or auto (per label key the lowest validation NLL)",
    }
    add_signature_flags(p, build_reference, helps)

    def run(a):
        from .lock import OutputLock

        data = a.data if a.data is None or len(a.data) > 1 else a.data[0]
        with OutputLock(Path(a.run) / ".lock", f"RUN_DIR {a.run}"):  # not while training writes it, nor twice
            build_reference(a.run, data, **signature_values(a, helps))

    return run


def _map_query(p):
    from .query import map_query

    p.add_argument("--run", "--run-dir", dest="run", required=True, help="reference RUN_DIR (--run-dir under torchrun)")
    add_data(p, "query: " + DATA_HELP)
    p.add_argument("--out", required=True, help="new RUN_DIR")
    helps = {
        "epochs": "fine-tuning epochs",
        "obs_filter": ("SOMA value_filter on the query cells", str),
        "layer": ("the query's matrix of raw counts: X, raw or a layers/ name (unset: the reference's)", str),
        "unfreeze_encoder": "also train the encoder",
        "unfreeze_decoder": "also train the decoder",
        "batch_size": ("cells per minibatch (unset: the reference run's)", int),
        "lr": ("learning rate (unset: the reference run's)", float),
        "overwrite": "replace an earlier run in --out",
    }
    add_signature_flags(p, map_query, helps)
    return lambda a: map_query(a.run, data_arg(a), a.out, **signature_values(a, helps))


def _prepare(p):
    from .prepare import prepare

    add_data(p, DATA_HELP)
    p.add_argument("--out", required=True, help="folder for stats.json, genes.csv, hvg.txt, library_size.png")
    p.add_argument("--genes", default=None, help="file of feature ids: only these genes, in this order")
    p.add_argument(
        "--convert", default=None, metavar="OUT.zarr", help="also write the (filtered) cells as a chunked "
        "AnnData-Zarr v3 store; stats are then computed from it",
    )  # fmt: skip
    helps = {
        "obs_filter": ("SOMA value_filter selecting cells", str),
        "layer": ("layer of raw counts (.h5ad: a layers/ name or 'raw')", str),
        "batch_key": ("obs column of batches for batch-aware HVG selection", str),
        "label_keys": "obs columns to count classes of",
        "n_top_genes": "highly variable genes to select (0: skip)",
        "span": "loess span of the seurat_v3 mean-variance fit",
        "shard_elems": ("shard the converted X arrays (elements per shard, a multiple of 32768)", int),
        "block_cells": "cells per dask task",
        "workers": "dask threads (and the fewest partitions with --scheduler)",
        "scheduler": (
            "dask.distributed scheduler address, e.g. tcp://head:8786, to run the passes on a "
            "cluster (every worker must see the data at the same path); unset: local threads",
            str,
        ),
        "overwrite": "replace an existing --convert output",
    }
    add_unlabeled(p, ", ".join(UNLABELED))
    add_signature_flags(p, prepare, helps)

    def run(a):
        prepare(
            data_arg(a), a.out, genes=read_gene_list(a.genes), convert_to=a.convert,
            unlabeled_categories=unlabeled_given(a), **signature_values(a, helps)
        )  # fmt: skip

    return run


def _evaluate(p):
    from .evaluate import evaluate

    p.add_argument("--emb", required=True, help="output of `bigatlas embed`")
    p.add_argument(
        "--label-keys", "--label-key", nargs="+", required=True, metavar="KEY", help="obs columns of cell-type "
        "labels: scIB bio conservation and the UMAP use the first; every key's predictions are scored",
    )  # fmt: skip
    p.add_argument("--batch-key", required=True, help="obs column of batches")
    add_data(p, "the embedded " + DATA_HELP + " (default: the one the embedding records)", required=False)
    p.add_argument("--truth-keys", nargs="*", default=[], help="further obs columns to score predictions against")
    p.add_argument("--cells", type=int, default=50_000, dest="n_cells", help="stratified subsample for scIB metrics")
    p.add_argument("--no-baseline", action="store_false", dest="baseline", help="skip the PCA baseline (no counts)")
    helps = {
        "obs_filter": ("filter the embedding was made with (default: recorded)", str),
        "run": ("RUN_DIR of the model (default: recorded); the report goes there", str),
        "out": ("report folder (default RUN_DIR/report)", str),
        "layer": (
            "the data's matrix of raw counts for the PCA baseline: X, raw or a layers/ name (default: the one the "
            "recorded data was embedded from)",
            str,
        ),
        "umap_cells": "cells drawn in the UMAP",
        "seed": "subsample / UMAP / k-means seed (k-means 0: scib-metrics' own draw)",
        "review_min_agreement": "label review: list the evaluated cells with fewer than this share of their 15 "
        "nearest evaluated cells under their own label in label_review.csv, with the neighbours' label (0: off; "
        "most telling on the embedding of a run trained without this label key)",
    }
    add_signature_flags(p, evaluate, helps)
    add_unlabeled(p, "the run's")

    def run(a):
        evaluate(
            a.emb, label_key=a.label_keys[0], batch_key=a.batch_key, data=data_arg(a), truth_keys=a.truth_keys,
            n_cells=a.n_cells, baseline=a.baseline, unlabeled_categories=unlabeled_given(a),
            **signature_values(a, helps),
        )  # fmt: skip

    return run


def _review(p):
    from .review_embedding import review_embedding

    p.add_argument("--emb", required=True, help="output of `bigatlas embed` (best: a run trained without --label-key)")
    p.add_argument("--label-key", required=True, help="obs column of the labels to review")
    p.add_argument("--out", required=True, help="CSV of the flagged cells (cell, row, label, suggested, agreement), "
                   "for `bigatlas train --drop-labels KEY=FILE`; the summary goes beside it as .json")  # fmt: skip
    add_data(p, "the embedded " + DATA_HELP + " (default: the one the embedding records)", required=False)
    helps = {
        "obs_filter": ("filter the embedding was made with (default: recorded)", str),
        "min_agreement": "flag a cell when fewer than this share of its 15 nearest labelled cells carry its label",
        "min_class_agreement": (
            "a class whose median agreement is below this is reported as not separated, none of its cells "
            "flagged (unset: --min-agreement)",
            float,
        ),
    }
    add_signature_flags(p, review_embedding, helps)
    add_unlabeled(p, "the run's")

    def run(a):
        review_embedding(
            a.emb, label_key=a.label_key, out=a.out, data=data_arg(a), unlabeled_categories=unlabeled_given(a),
            **signature_values(a, helps),
        )  # fmt: skip

    return run


COMMANDS = {  # name: (help, builder(parser) -> run(args))
    "synth": ("write a synthetic atlas (ZINB counts, batch effects, label hierarchy)", _synth),
    "stream": ("stream a store in shuffled minibatches and report throughput", _stream),
    "train": ("train scAtlasVAE on a store (scripts/train.py under accelerate launch for several processes)", _train),
    "embed": (
        "write latents and label predictions of a store to disk, in chunks "
        "(scripts/embed.py under accelerate launch for several processes)",
        _embed,
    ),
    "reference": (
        "(re)build RUN_DIR/reference: the kNN index, label calibration and UMAP that embed's label transfer "
        "reads (training writes it; this is for older runs or other settings)",
        _reference,
    ),
    "map-query": (
        "scArches-style surgery: extend batch embeddings with a query's new categories and fine-tune them "
        "(everything else frozen by default)",
        _map_query,
    ),
    "prepare": (
        "out-of-core passes (dask): gene statistics, batch-aware seurat_v3 HVGs (hvg.txt for --genes), "
        "class counts; .h5ad / SOMA / Census → chunked Zarr",
        _prepare,
    ),
    "evaluate": (
        "scIB metrics of an embedding (vs a PCA baseline), label-prediction accuracy / macro-F1, UMAP and "
        "confusion plots, report.html",
        _evaluate,
    ),
    "review": (
        "label review of an embedding: the labelled cells whose nearest cells mostly carry another label, as a "
        "CSV for train --drop-labels",
        _review,
    ),
}


DESCRIPTION = (
    "scAtlasVAE for atlases of millions of cells: train on raw counts streamed from disk (AnnData-Zarr, .h5ad, "
    "TileDB-SOMA, the CELLxGENE Census; one process or several), then embed and label query cells in chunks. "
    "A usual order: prepare (genes, a fast copy) → train → embed → evaluate. `bigatlas COMMAND --help` for each."
)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*autosharding.*")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="bigatlas", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, build) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        if argv and argv[0] == name:
            p.set_defaults(func=build(p))
    a = parser.parse_args(argv)
    return reported(a.command, lambda: a.func(a))


if __name__ == "__main__":
    sys.exit(main())
