"""Train (thin): accelerate launch [--multi_gpu --num_processes N] scripts/train.py --data … --out RUN_DIR
(the same as `-m bigatlas.train`, which needs no checkout)."""

from bigatlas.train import main

if __name__ == "__main__":
    raise SystemExit(main())
