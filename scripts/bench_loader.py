"""Loader benchmark (thin wrapper): python scripts/bench_loader.py [--cells N] … ; see bigatlas.bench_loader."""

import sys

from bigatlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-loader", *sys.argv[1:]]))
