"""`bigatlas` console entry point: synth | stream | prepare | train | embed | map-query | evaluate |
bench-loader | bench-train | bench-infer | bench-prepare."""

from __future__ import annotations

import argparse
import sys
import time
import warnings


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except unset ones (None, False, []) and those the help text already states."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default == []
        if unset or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_organism(p) -> None:
    p.add_argument(
        "--organism",
        default=None,
        help="Census organism for census:<version> data, e.g. 'Mus musculus' (None: homo_sapiens)",
    )


def read_gene_list(path) -> tuple[str, ...] | None:
    """A --genes file: one feature id (or name) per line, blank lines ignored; None without a file."""
    return tuple(g.strip() for g in open(path) if g.strip()) if path else None


def _add_synth(sub):
    from .synth import SynthSpec

    p = sub.add_parser(
        "synth", help="write a synthetic atlas (ZINB counts, batch effects, label hierarchy)", formatter_class=_Help
    )
    p.add_argument("out", help="output path (.zarr directory or SOMA experiment directory)")
    p.add_argument("--cells", type=int, required=True, help="number of cells")
    p.add_argument("--genes", type=int, default=2000, help="number of genes")
    p.add_argument("--format", choices=["zarr", "soma"], default="zarr", help="store format")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--order",
        choices=["study", "cell_type", "random"],
        default="study",
        help="storage order of cells (cell_type = sorted by type, the hard case for shuffling)",
    )
    p.add_argument("--studies", type=int, default=6, help="number of studies (dataset_id)")
    p.add_argument("--donors-per-study", type=int, default=4, help="donors per study (donor_id)")
    p.add_argument("--mean-library", type=float, default=SynthSpec.mean_library, help="mean counts per cell")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_run_synth)


def _run_synth(a):
    from .synth import synth

    t = time.perf_counter()
    spec = synth(
        a.out,
        a.cells,
        a.genes,
        a.format,
        seed=a.seed,
        overwrite=a.overwrite,
        order=a.order,
        n_studies=a.studies,
        donors_per_study=a.donors_per_study,
        mean_library=a.mean_library,
    )
    print(
        f"wrote {spec.n_cells} cells x {spec.n_genes} genes ({a.format}) to {a.out} in {time.perf_counter() - t:.1f}s"
    )


def _add_stream(sub):
    p = sub.add_parser(
        "stream", help="stream a store in shuffled minibatches and report throughput", formatter_class=_Help
    )
    p.add_argument("data", help="AnnData-Zarr store, SOMA experiment or census:<version>")
    _add_organism(p)
    p.add_argument("--batch-size", type=int, default=512, help="cells per minibatch")
    p.add_argument("--epochs", type=int, default=1, help="epochs to stream")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--workers", type=int, default=1, help="reader threads")
    p.add_argument("--obs-filter", default=None, help="SOMA value_filter, e.g. \"tissue_general == 'blood'\"")
    p.add_argument("--obs-keys", nargs="*", default=[], help="obs columns delivered as codes")
    p.set_defaults(func=_run_stream)


def _run_stream(a):
    from tqdm import tqdm

    from loaders import CellStream, census_spec, open_store

    store = open_store(census_spec(a.data, a.organism), obs_filter=a.obs_filter)
    stream = CellStream(store, batch_size=a.batch_size, seed=a.seed, num_workers=a.workers, obs_keys=a.obs_keys)
    print(f"{a.data}: {store.n_obs} cells x {store.n_vars} genes, {len(stream)} minibatches per epoch")
    for epoch in range(a.epochs):
        stream.set_epoch(epoch)
        t, cells = time.perf_counter(), 0
        with tqdm(total=store.n_obs, unit="cell", unit_scale=True, desc=f"epoch {epoch}") as bar:
            for batch in stream:
                cells += len(batch)
                bar.update(len(batch))
        print(
            f"epoch {epoch}: {cells} cells in {time.perf_counter() - t:.2f}s "
            f"({cells / (time.perf_counter() - t):,.0f} cells/s)"
        )


BENCHMARKS = {  # sub-command: (module, help); each module has add_arguments(parser) and run(args)
    "bench-loader": ("bench_loader", "loader benchmark vs annbatch and tiledbsoma-ml (JSON)"),
    "bench-train": ("bench_train", "training benchmark: streaming vs in-memory, vs scatlasvae, memory"),
    "bench-infer": ("bench_infer", "inference benchmark: embed-to-disk vs in-memory forward, RSS"),
    "bench-prepare": ("bench_prepare", "prepare benchmark: out-of-core passes vs scanpy in memory (JSON)"),
}


def _add_benchmarks(sub, command: str | None):
    """A benchmark module (torch, peer loaders) is imported only when its command runs: every other
    command, `bigatlas synth` included, starts without it."""
    import importlib

    for name, (module, help_) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_, formatter_class=_Help)
        if name == command:
            mod = importlib.import_module(f".{module}", __package__)
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)


def add_train_arguments(p) -> None:
    """Flags of `bigatlas train` and scripts/train.py; unset flags keep the config file's value."""
    from .config import ModelConfig, TrainConfig

    m, t = ModelConfig(), TrainConfig()
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        required=True,
        help="AnnData-Zarr store, SOMA experiment or census:<version> "
        "(CELLxGENE Census release, e.g. census:2025-01-30)",
    )
    _add_organism(d)
    d.add_argument("--batch-key", required=True, help="obs column of the batch (embedded in the decoder)")
    d.add_argument("--covariate-keys", nargs="*", default=None, help="further categorical obs columns to embed")
    d.add_argument("--label-keys", nargs="*", default=None, help="obs columns with cell-type labels to predict")
    d.add_argument("--obs-filter", default=None, help="SOMA value_filter selecting the training cells")
    d.add_argument("--layer", default=None, help="Zarr layer / SOMA X layer of raw counts (default X / raw)")
    d.add_argument("--genes", default=None, help="file with one feature id (or name) per line, in model order")
    d.add_argument(
        "--allow-non-integer",
        action="store_true",
        default=None,
        help="accept non-integer values (default: raw integer counts are required)",
    )
    p.add_argument("--out", required=True, help="RUN_DIR to write")
    p.add_argument("--config", default=None, help="TOML/JSON with [model], [train], [data] sections")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/latest")
    g = p.add_argument_group("training (defaults shown are the built-in ones)")
    g.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="epochs (default: min(round(20000 / n_cells * 400), 400), at least 10)",
    )
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (off)")
    g.add_argument("--batch-size", type=int, default=None, help=f"cells per minibatch per process ({t.batch_size})")
    g.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate ({t.lr})")
    g.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay ({t.weight_decay})")
    g.add_argument("--kl-warmup-epochs", type=float, default=None, help=f"KL warm-up epochs ({t.kl_warmup_epochs})")
    g.add_argument(
        "--label-start-epoch",
        type=int,
        default=None,
        help=f"epoch from which the label loss applies ({t.label_start_epoch})",
    )
    g.add_argument("--val-fraction", type=float, default=None, help=f"held-out cell fraction ({t.val_fraction})")
    g.add_argument(
        "--early-stopping-patience",
        type=int,
        default=None,
        help="stop after this many epochs without validation improvement (off)",
    )
    g.add_argument(
        "--checkpoint-every-steps",
        type=int,
        default=None,
        help=f"mid-epoch checkpoint interval ({t.checkpoint_every_steps})",
    )
    g.add_argument("--mixed-precision", choices=["no", "bf16"], default=None, help="bf16 on GPUs (no)")
    g.add_argument("--seed", type=int, default=None, help=f"seed of shuffling, hold-out and init ({t.seed})")
    g.add_argument("--workers", type=int, default=None, help=f"reader threads per process ({t.num_workers})")
    mg = p.add_argument_group("model")
    mg.add_argument("--n-latent", type=int, default=None, help=f"latent dimensions ({m.n_latent})")
    mg.add_argument("--likelihood", choices=["zinb", "nb"], default=None, help=f"({m.likelihood})")
    mg.add_argument("--dispersion", choices=["gene-cell", "gene", "gene-batch"], default=None, help=f"({m.dispersion})")
    mg.add_argument("--zi-gate", choices=["gene", "gene-cell"], default=None, help=f"({m.zi_gate})")
    p.add_argument("--trace-cells", action="store_true", help=argparse.SUPPRESS)


def config_from_args(a):
    from .config import RunConfig

    cfg = RunConfig.load(a.config) if a.config else RunConfig()
    genes = read_gene_list(a.genes)
    from loaders import census_spec

    cfg = cfg.override(
        "data",
        data=census_spec(a.data, a.organism),
        batch_key=a.batch_key,
        covariate_keys=a.covariate_keys,
        label_keys=a.label_keys,
        obs_filter=a.obs_filter,
        layer=a.layer,
        genes=genes,
        allow_non_integer=a.allow_non_integer,
    )
    cfg = cfg.override(
        "train",
        max_epochs=a.max_epochs,
        max_steps=a.max_steps,
        batch_size=a.batch_size,
        lr=a.lr,
        weight_decay=a.weight_decay,
        kl_warmup_epochs=a.kl_warmup_epochs,
        label_start_epoch=a.label_start_epoch,
        val_fraction=a.val_fraction,
        early_stopping_patience=a.early_stopping_patience,
        checkpoint_every_steps=a.checkpoint_every_steps,
        mixed_precision=a.mixed_precision,
        seed=a.seed,
        num_workers=a.workers,
    )
    return cfg.override(
        "model", n_latent=a.n_latent, likelihood=a.likelihood, dispersion=a.dispersion, zi_gate=a.zi_gate
    )


def _run_train(a):
    from .train import train

    train(config_from_args(a), a.out, resume=a.resume, trace_cells=a.trace_cells)


def _add_train(sub):
    p = sub.add_parser(
        "train", help="train scAtlasVAE on a store (use scripts/train.py under accelerate launch for several processes)"
    )
    add_train_arguments(p)
    p.set_defaults(func=_run_train)


def add_embed_arguments(p) -> None:
    p.add_argument("--run", required=True, help="trained RUN_DIR")
    p.add_argument("--data", required=True, help="query store (AnnData-Zarr, SOMA or census:<version>)")
    _add_organism(p)
    p.add_argument("--out", required=True, help="output AnnData-Zarr store (obsm/X_bigatlas, obs/<key>_pred …)")
    p.add_argument("--chunk-size", type=int, default=16384, help="cells per output chunk (resume unit)")
    p.add_argument("--batch-size", type=int, default=4096, help="cells per forward pass")
    p.add_argument("--obs-filter", default=None, help="SOMA value_filter on the query cells")
    p.add_argument("--full-probabilities", action="store_true", help="also write obsm/<key>_probabilities")
    p.add_argument(
        "--unknown-threshold", type=float, default=0.5, help="flag <key>_unknown when the top probability is below this"
    )
    p.add_argument(
        "--min-gene-overlap",
        type=float,
        default=0.5,
        help="refuse a query sharing fewer of the model's genes than this fraction",
    )
    p.add_argument("--overwrite", action="store_true", help="recompute a complete or different output")
    p.add_argument("--allow-non-integer", action="store_true", help="accept non-integer values")


def _run_embed(a):
    from loaders import census_spec

    from .infer import embed

    embed(
        a.run,
        census_spec(a.data, a.organism),
        a.out,
        chunk_size=a.chunk_size,
        batch_size=a.batch_size,
        obs_filter=a.obs_filter,
        overwrite=a.overwrite,
        full_probabilities=a.full_probabilities,
        unknown_threshold=a.unknown_threshold,
        min_gene_overlap=a.min_gene_overlap,
        allow_non_integer=a.allow_non_integer,
    )


def _add_embed(sub):
    p = sub.add_parser(
        "embed",
        help="write latents and label predictions of a store to disk, in chunks "
        "(scripts/embed.py under accelerate launch for several processes)",
        formatter_class=_Help,
    )
    add_embed_arguments(p)
    p.set_defaults(func=_run_embed)


def _add_map_query(sub):
    p = sub.add_parser(
        "map-query",
        help="scArches-style surgery: extend batch embeddings with a query's new "
        "categories and fine-tune them (everything else frozen by default)",
        formatter_class=_Help,
    )
    p.add_argument("--run", required=True, help="reference RUN_DIR")
    p.add_argument("--data", required=True, help="query store")
    p.add_argument("--out", required=True, help="new RUN_DIR")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    p.add_argument("--obs-filter", default=None, help="SOMA value_filter on the query cells")
    p.add_argument("--unfreeze-encoder", action="store_true", help="also train the encoder")
    p.add_argument("--unfreeze-decoder", action="store_true", help="also train the decoder")

    def run(a):
        from .query import map_query

        map_query(
            a.run,
            a.data,
            a.out,
            epochs=a.epochs,
            obs_filter=a.obs_filter,
            unfreeze_encoder=a.unfreeze_encoder,
            unfreeze_decoder=a.unfreeze_decoder,
        )

    p.set_defaults(func=run)


def _add_prepare(sub):
    p = sub.add_parser(
        "prepare",
        help="out-of-core passes (dask): gene statistics, batch-aware seurat_v3 HVGs "
        "(hvg.txt for --genes), class counts; .h5ad / SOMA / Census → chunked Zarr",
        formatter_class=_Help,
    )
    p.add_argument("data", help=".h5ad file, AnnData-Zarr store, SOMA experiment or census:<version>")
    p.add_argument("--out", required=True, help="folder for stats.json, genes.csv, hvg.txt, library_size.png")
    _add_organism(p)
    p.add_argument("--obs-filter", default=None, help="SOMA value_filter selecting cells")
    p.add_argument("--layer", default=None, help="layer of raw counts (.h5ad: a layers/ name or 'raw')")
    p.add_argument("--genes", default=None, help="file of feature ids: only these genes, in this order")
    p.add_argument("--batch-key", default=None, help="obs column of batches for batch-aware HVG selection")
    p.add_argument("--label-keys", nargs="*", default=[], help="obs columns to count classes of")
    p.add_argument("--n-top-genes", type=int, default=2000, help="highly variable genes to select (0: skip)")
    p.add_argument("--span", type=float, default=0.3, help="loess span of the seurat_v3 mean-variance fit")
    p.add_argument(
        "--convert",
        default=None,
        metavar="OUT.zarr",
        help="also write the (filtered) cells as a chunked AnnData-Zarr v3 store; stats are then computed from it",
    )
    p.add_argument(
        "--shard-elems",
        type=int,
        default=None,
        help="shard the converted X arrays (elements per shard, a multiple of 32768)",
    )
    p.add_argument("--block-cells", type=int, default=8192, help="cells per dask task")
    p.add_argument("--workers", type=int, default=2, help="dask threads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --convert output")

    def run(a):
        from loaders import census_spec

        from .prepare import prepare

        prepare(
            census_spec(a.data, a.organism),
            a.out,
            batch_key=a.batch_key,
            label_keys=a.label_keys,
            obs_filter=a.obs_filter,
            layer=a.layer,
            genes=read_gene_list(a.genes),
            n_top_genes=a.n_top_genes,
            span=a.span,
            convert_to=a.convert,
            shard_elems=a.shard_elems,
            block_cells=a.block_cells,
            workers=a.workers,
            overwrite=a.overwrite,
        )

    p.set_defaults(func=run)


def _add_evaluate(sub):
    p = sub.add_parser(
        "evaluate",
        help="scIB metrics of an embedding (vs a PCA baseline), label-prediction "
        "accuracy / macro-F1, UMAP and confusion plots, report.html",
        formatter_class=_Help,
    )
    p.add_argument("--emb", required=True, help="output of `bigatlas embed`")
    p.add_argument("--label-key", required=True, help="obs column of cell-type labels")
    p.add_argument("--batch-key", required=True, help="obs column of batches")
    p.add_argument("--data", default=None, help="store the embedding was made from (default: the one it records)")
    _add_organism(p)
    p.add_argument("--obs-filter", default=None, help="filter the embedding was made with (default: recorded)")
    p.add_argument("--run", default=None, help="RUN_DIR of the model (default: recorded); the report goes there")
    p.add_argument("--out", default=None, help="report folder (default RUN_DIR/report)")
    p.add_argument("--truth-keys", nargs="*", default=[], help="further obs columns to score predictions against")
    p.add_argument("--cells", type=int, default=50_000, help="stratified subsample for the scIB metrics")
    p.add_argument("--umap-cells", type=int, default=20_000, help="cells drawn in the UMAP")
    p.add_argument("--no-baseline", action="store_true", help="skip the PCA baseline (reads no counts)")
    p.add_argument("--seed", type=int, default=0, help="subsample / UMAP seed")

    def run(a):
        from loaders import census_spec

        from .evaluate import evaluate

        data = census_spec(a.data, a.organism) if a.data else None
        evaluate(
            a.emb,
            label_key=a.label_key,
            batch_key=a.batch_key,
            data=data,
            obs_filter=a.obs_filter,
            run=a.run,
            out=a.out,
            truth_keys=a.truth_keys,
            n_cells=a.cells,
            umap_cells=a.umap_cells,
            seed=a.seed,
            baseline=not a.no_baseline,
        )

    p.set_defaults(func=run)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*autosharding.*")
    parser = argparse.ArgumentParser(prog="bigatlas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth(sub)
    _add_stream(sub)
    _add_train(sub)
    _add_embed(sub)
    _add_map_query(sub)
    _add_prepare(sub)
    _add_evaluate(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    _add_benchmarks(sub, argv[0] if argv else None)
    a = parser.parse_args(argv)
    from loaders import StoreError

    try:
        a.func(a)
    except (StoreError, FileExistsError, FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"bigatlas {a.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
