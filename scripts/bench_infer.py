"""Inference benchmark (thin wrapper): python scripts/bench_infer.py …; see bigatlas.bench_infer."""

import sys

from bigatlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-infer", *sys.argv[1:]]))
