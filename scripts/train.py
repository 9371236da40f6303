"""Train (thin): accelerate launch [--multi_gpu --num_processes N] scripts/train.py --data … --out RUN_DIR"""

import sys

from bigatlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
