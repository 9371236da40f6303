"""`bigatlas` console entry point: synth | stream | bench-loader (more subcommands join as they land)."""
from __future__ import annotations

import argparse
import sys
import time
import warnings


def _add_synth(sub):
    from .synth import SynthSpec

    p = sub.add_parser("synth", help="write a synthetic atlas (ZINB counts, batch effects, label hierarchy)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="output path (.zarr directory or SOMA experiment directory)")
    p.add_argument("--cells", type=int, required=True, help="number of cells")
    p.add_argument("--genes", type=int, default=2000, help="number of genes")
    p.add_argument("--format", choices=["zarr", "soma"], default="zarr", help="store format")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--order", choices=["study", "cell_type", "random"], default="study",
                   help="storage order of cells (cell_type = sorted by type, the hard case for shuffling)")
    p.add_argument("--studies", type=int, default=6, help="number of studies (dataset_id)")
    p.add_argument("--donors-per-study", type=int, default=4, help="donors per study (donor_id)")
    p.add_argument("--mean-library", type=float, default=SynthSpec.mean_library, help="mean counts per cell")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_run_synth)


def _run_synth(a):
    from .synth import synth

    t = time.perf_counter()
    spec = synth(a.out, a.cells, a.genes, a.format, seed=a.seed, overwrite=a.overwrite, order=a.order,
                 n_studies=a.studies, donors_per_study=a.donors_per_study, mean_library=a.mean_library)
    print(f"wrote {spec.n_cells} cells x {spec.n_genes} genes ({a.format}) to {a.out} "
          f"in {time.perf_counter() - t:.1f}s")


def _add_stream(sub):
    p = sub.add_parser("stream", help="stream a store in shuffled minibatches and report throughput",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", help="AnnData-Zarr store or SOMA experiment")
    p.add_argument("--batch-size", type=int, default=512, help="cells per minibatch")
    p.add_argument("--epochs", type=int, default=1, help="epochs to stream")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--workers", type=int, default=1, help="reader threads")
    p.add_argument("--obs-filter", default=None, help="SOMA value_filter, e.g. \"tissue_general == 'blood'\"")
    p.add_argument("--obs-keys", nargs="*", default=[], help="obs columns delivered as codes")
    p.set_defaults(func=_run_stream)


def _run_stream(a):
    from tqdm import tqdm

    from loaders import CellStream, open_store

    store = open_store(a.data, obs_filter=a.obs_filter)
    stream = CellStream(store, batch_size=a.batch_size, seed=a.seed, num_workers=a.workers, obs_keys=a.obs_keys)
    print(f"{a.data}: {store.n_obs} cells x {store.n_vars} genes, {len(stream)} minibatches per epoch")
    for epoch in range(a.epochs):
        stream.set_epoch(epoch)
        t, cells = time.perf_counter(), 0
        with tqdm(total=store.n_obs, unit="cell", unit_scale=True, desc=f"epoch {epoch}") as bar:
            for batch in stream:
                cells += len(batch)
                bar.update(len(batch))
        print(f"epoch {epoch}: {cells} cells in {time.perf_counter() - t:.2f}s "
              f"({cells / (time.perf_counter() - t):,.0f} cells/s)")


def _add_bench_loader(sub):
    p = sub.add_parser("bench-loader", help="loader benchmark vs annbatch and tiledbsoma-ml (JSON)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from .bench_loader import add_arguments

    add_arguments(p)
    p.set_defaults(func=lambda a: __import__("bigatlas.bench_loader", fromlist=["run"]).run(a))


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*autosharding.*")
    parser = argparse.ArgumentParser(prog="bigatlas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synth(sub)
    _add_stream(sub)
    _add_bench_loader(sub)
    a = parser.parse_args(argv)
    from loaders import StoreError

    try:
        a.func(a)
    except (StoreError, FileExistsError) as e:
        print(f"bigatlas {a.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
