"""What the benchmarks share: argument parsing, synthetic stores built once under --data-dir, a
training config, peak-RSS sampling and the result writer."""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

KEYS = dict(batch_key="dataset_id", covariate_keys=("donor_id",), label_keys=("cell_type",))


def main(doc: str, add_arguments, run, argv=None) -> dict:
    """`python -m bench.<name> [flags]`: parse with the module's add_arguments, then run."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def ensure_store(data_dir, cells: int, genes: int, fmt: str = "zarr", order: str = "study", prefix="train") -> str:
    """A synthetic atlas of that size under data_dir, built on first use and reused after."""
    from bigatlas.synth import synth

    path = Path(data_dir) / f"{prefix}_{cells}x{genes}.{fmt}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        synth(path, cells, genes, fmt, seed=0, order=order)
        print(f"built {path} in {time.perf_counter() - t:.0f}s", flush=True)
    return str(path)


def train_config(data, epochs, batch_size, **train):
    """The benchmarks' run: scAtlasVAE's architecture (gene-cell dispersion and gate, as scatlasvae has
    them, so T2 compares the same model), not the quality defaults."""
    from bigatlas.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig(dispersion="gene-cell", zi_gate="gene-cell"),
        train=TrainConfig(max_epochs=epochs, batch_size=batch_size, checkpoint_every_steps=0, **train),
        data=DataConfig(data=data, **KEYS),
    )


class PeakRSS:
    """Samples this process's RSS every 20 ms; .growth_mb = peak minus the RSS at start."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def write_results(res: dict, out) -> dict:
    """Print the benchmark's JSON and write it to `out` (bench/results/*.json)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res
