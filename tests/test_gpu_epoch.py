"""bench.gpu_epoch's --trainer mode, on the CPU: the trainer's epoch loop over a replayed pool of batches."""

from argparse import Namespace


def test_trainer_mode_replays_the_pool_to_the_asked_cells(tmp_path):
    from bench.gpu_epoch import trainer_epoch

    a = Namespace(data_dir=str(tmp_path), store_cells=600, genes=200, pool=3, cells=1000, compile_loss="off")
    row = trainer_epoch(a, 64, "no")
    # 1,000 cells at 64 a batch: 16 steps from a pool of 3 batches, every one an optimizer step
    assert row["steps"] == 16 and row["optimizer_steps"] == 16
    assert row["cells_per_s"] > 0 and "sync_sites" not in row  # nothing to count without CUDA
    assert not (tmp_path / "gpu_trainer_run").exists()
