"""Benchmarks (not part of the installed package): run from the repository root as
`python -m bench.loader`, `python -m bench.train`, `python -m bench.infer`, `python -m bench.prepare`.
Each prints JSON with ratios measured side by side in one run and writes bench/results/<name>.json."""
