"""`bigatlas stream`: stream a store in shuffled minibatches and report throughput per epoch."""

from __future__ import annotations

import time

from tqdm import tqdm

from loaders import CellStream, open_store


def stream_report(
    data: str, *, batch_size: int = 512, epochs: int = 1, seed: int = 0, workers: int = 1, obs_filter=None,
    obs_keys=(),
) -> list[float]:  # fmt: skip
    """Cells/s of each epoch, printed and returned."""
    store = open_store(data, obs_filter=obs_filter)
    stream = CellStream(store, batch_size=batch_size, seed=seed, num_workers=workers, obs_keys=obs_keys)
    print(f"{data}: {store.n_obs} cells x {store.n_vars} genes, {len(stream)} minibatches per epoch")
    rates = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        t, cells = time.perf_counter(), 0
        with tqdm(total=store.n_obs, unit="cell", unit_scale=True, desc=f"epoch {epoch}") as bar:
            for batch in stream:
                cells += len(batch)
                bar.update(len(batch))
        dt = time.perf_counter() - t
        rates.append(cells / dt)
        print(f"epoch {epoch}: {cells} cells in {dt:.2f}s ({cells / dt:,.0f} cells/s)")
    return rates
