"""Training benchmark (thin wrapper): python scripts/bench_train.py [--only T1 T2 M1] …; see bigatlas.bench_train."""

import sys

from bigatlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-train", *sys.argv[1:]]))
