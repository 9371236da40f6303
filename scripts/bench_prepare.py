"""Prepare benchmark (thin wrapper): python scripts/bench_prepare.py …; see bigatlas.bench_prepare."""

import sys

from bigatlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-prepare", *sys.argv[1:]]))
