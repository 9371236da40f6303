"""Embed (thin): accelerate launch [--multi_gpu --num_processes N] scripts/embed.py --run RUN --data URI --out OUT"""

import sys

from bigatlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
