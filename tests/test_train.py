"""Training: resume after SIGKILL equals an uninterrupted run, 2-process runs agree with the partition,
the model learns an integrated latent space, and bad launches fail loudly."""

import csv
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import accelerate_launcher, run_script
from safetensors.numpy import load_file

from bigatlas.batches import holdout_mask
from bigatlas.config import TrainConfig
from bigatlas.reference import read_reference
from bigatlas.reference_build import build_reference
from bigatlas.synth import synth


@pytest.fixture(scope="module")
def small_atlas(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "small.zarr"
    synth(path, 2400, 120, "zarr", seed=1, n_studies=3, donors_per_study=2)
    return str(path)


def run_train(args, env_extra=None, launcher=(), check=True):
    return run_script("train.py", args, env_extra, launcher, check)


def base_args(data, out, epochs=2):
    return [
        "--data",
        data,
        "--batch-key",
        "donor_id",
        "--label-keys",
        "cell_type",
        "--out",
        str(out),
        "--max-epochs",
        str(epochs),
        "--batch-size",
        "64",
        "--checkpoint-every-steps",
        "7",
    ]


def weights(run):
    return load_file(str(Path(run) / "model.safetensors"))


_UNINTERRUPTED: dict[tuple, Path] = {}


@pytest.mark.parametrize(
    "fault,compile_loss,precision,extra",
    [
        ("after_step:40", "off", "no", []),
        ("checkpoint_written:35", "off", "no", []),
        # the epoch's end (step 38): its row written, its checkpoint not; the resumed run writes that row once
        ("checkpoint_written:38", "off", "no", []),
        ("after_step:40", "on", "no", []),
        ("after_step:40", "off", "bf16", []),  # on the CPU: the wide layers' bfloat16 products (bf16_linear)
        ("after_step:40", "off", "no", ["--batch-align", "10"]),  # its pool of latest cells is in the checkpoint
        ("after_step:40", "off", "no", ["--ema-start", "warmup"]),  # the average's start is in the checkpoint
        # BatchNorm: its statistics, gathered anew for the average after training, are the uninterrupted run's
        ("after_step:40", "off", "no", ["--norm", "batch"]),
    ],
)
def test_resume_after_sigkill_is_bit_identical(
    small_atlas, tmp_path, tmp_path_factory, fault, compile_loss, precision, extra
):
    # no reference UMAP: it is laid out from the final weights compared here, and costs ~15 s a run (numba's JIT)
    settings = ["--compile-loss", compile_loss, "--mixed-precision", precision, "--no-reference-umap", *extra]
    ref = _UNINTERRUPTED.get(tuple(settings))
    if ref is None:  # one uninterrupted run per settings, for every fault; kept only once it has finished
        ref = tmp_path_factory.mktemp("uninterrupted") / "ref"
        run_train([*base_args(small_atlas, ref), *settings])
        _UNINTERRUPTED[tuple(settings)] = ref
    cut = tmp_path / "cut"
    res = run_train([*base_args(small_atlas, cut), *settings], {"BIGATLAS_FAULT": fault}, check=False)
    assert res.returncode == -9, res.stderr[-2000:]
    assert not (cut / "model.safetensors").exists()
    latest = (cut / "checkpoints" / "latest").read_text().strip()
    latest_step, step = int(latest.split("-")[1]), int(fault.split(":")[1])
    if fault.startswith("checkpoint_written"):  # killed while writing: that checkpoint is never 'latest'
        assert (cut / "checkpoints" / f".tmp-step-{step:09d}").is_dir() and latest_step < step
    else:
        assert latest_step <= step
    assert json.loads((ref / "config.json").read_text())["config"]["train"]["mixed_precision"] == precision
    resumed = run_train([*base_args(small_atlas, cut), *settings, "--resume"])
    assert "torch.compile of" not in resumed.stderr
    assert f"resumed from {latest}" in resumed.stdout
    a, b = weights(ref), weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert read_reference(ref).id == read_reference(cut).id  # the resumed run's reference index is the same
    rows_ref, rows_cut = (list(csv.DictReader((run / "metrics.csv").open())) for run in (ref, cut))
    assert [r["epoch"] for r in rows_cut] == [r["epoch"] for r in rows_ref] == ["0", "1"]
    assert [r["loss"] for r in rows_cut] == [r["loss"] for r in rows_ref]


def test_a_run_dir_holding_a_run_is_refused_and_with_overwrite_replaced_whole(small_atlas, tmp_path):
    """A new run over an earlier one: refused, the earlier one untouched; with --overwrite none of the earlier
    run's epoch rows or checkpoints is left (its later steps' checkpoints pruned the new run's, and `latest` named
    a checkpoint that was gone)."""
    run = tmp_path / "r"
    quick = ["--no-reference-umap", "--reference-cells", "500"]
    run_train([*base_args(small_atlas, run), *quick])
    weights = (run / "model.safetensors").read_bytes()
    res = run_train([*base_args(small_atlas, run, epochs=1), *quick], check=False)
    assert res.returncode == 2 and "holds an earlier run" in res.stderr and "--overwrite" in res.stderr, res.stderr
    assert (run / "model.safetensors").read_bytes() == weights
    run_train([*base_args(small_atlas, run, epochs=1), *quick, "--overwrite"])
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["0"]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert (run / "checkpoints" / latest).is_dir() and steps[-1] == int(latest.split("-")[1]) == int(rows[0]["step"])
    assert (run / "model.safetensors").read_bytes() != weights and (run / "reference").is_dir()
    res = run_train([*base_args(small_atlas, run, epochs=1), "--overwrite", "--resume"], check=False)
    assert res.returncode == 2 and "pass one of them" in res.stderr, res.stderr
    mine = tmp_path / "mine"  # a user's folder that has a `report` of its own: never removed
    (mine / "report").mkdir(parents=True)
    res = run_train([*base_args(small_atlas, mine, epochs=1), "--overwrite"], check=False)
    assert res.returncode == 2 and "not a bigatlas run dir" in res.stderr and (mine / "report").is_dir(), res.stderr


def test_resume_with_other_settings_is_refused(small_atlas, tmp_path):
    run = tmp_path / "r"
    run_train(base_args(small_atlas, run, epochs=1))
    res = run_train([*base_args(small_atlas, run, epochs=1), "--lr", "0.5", "--resume"], check=False)
    assert res.returncode == 2 and "differs from this run's settings (train.lr)" in res.stderr


def test_a_run_dir_from_before_later_settings_resumes_as_it_was_trained(tmp_path):
    """A config.json without the settings added since reads them at the value that reproduces it (AdamW
    epsilon 1e-8, no weight average, ...): a resume with those values is allowed, the new defaults are
    refused by name."""
    from dataclasses import replace

    from bigatlas.config import DataConfig, RunConfig
    from bigatlas.rundir import ADDED_MODEL_SETTINGS, ADDED_SETTINGS, RunDir

    run, cfg = RunDir(tmp_path / "r"), RunConfig(data=DataConfig(data="x.zarr", batch_key="study"))
    run.write_config(cfg)
    saved = json.loads(run.config_file.read_text())
    for key in ADDED_SETTINGS:
        del saved["config"]["train"][key]
    for key in ADDED_MODEL_SETTINGS:
        del saved["config"]["model"][key]
    run.config_file.write_text(json.dumps(saved))
    old = replace(cfg, train=replace(cfg.train, **ADDED_SETTINGS), model=replace(cfg.model, **ADDED_MODEL_SETTINGS))
    run.check_resumable(old)
    assert run.read_config() == old
    with pytest.raises(
        ValueError,
        match=r"train\.adam_eps, train\.compile_loss, train\.ema_decay, train\.ema_every, train\.missing_genes\)",
    ):
        run.check_resumable(cfg)


def test_mixed_precision_auto_is_resolved_and_a_resumed_run_keeps_its_own(tmp_path):
    """auto becomes what it means on this device, as config.json records it: bf16 products on a CPU with
    bfloat16 matrix units, float32 elsewhere and on GPUs; a resumed run keeps the precision it was trained with."""
    from dataclasses import replace

    from bigatlas.bf16_linear import native_bf16
    from bigatlas.config import DataConfig, RunConfig
    from bigatlas.rundir import RunDir
    from bigatlas.train import _resolved_precision

    cfg = RunConfig(data=DataConfig(data="x.zarr", batch_key="study"))
    assert cfg.train.mixed_precision == "auto"
    run = RunDir(tmp_path / "r")
    native = "bf16" if native_bf16() else "no"
    assert _resolved_precision(cfg, run, False, "cpu").train.mixed_precision == native
    assert _resolved_precision(cfg, run, False, "cuda").train.mixed_precision == "no"
    for before in ("no", "bf16"):
        run.write_config(replace(cfg, train=replace(cfg.train, mixed_precision=before)))
        resumed = _resolved_precision(cfg, run, True, "cpu")
        assert resumed.train.mixed_precision == before
        run.check_resumable(resumed)
        assert _resolved_precision(cfg, run, False, "cpu").train.mixed_precision == native  # a new run: this CPU's
    explicit = replace(cfg, train=replace(cfg.train, mixed_precision="no"))
    assert _resolved_precision(explicit, run, True, "cpu") is explicit
    with pytest.raises(ValueError, match="mixed_precision must be one of auto, no, bf16, not 'fp16'"):
        TrainConfig(mixed_precision="fp16")


def test_unset_label_dependent_settings_are_resolved_by_the_label_keys_and_a_resumed_run_keeps_its_own(tmp_path):
    """config.json records the latent size, the prior's components, the KL weight and early stopping's floor in cells
    the run has: 10 / 0 / 0.1 / 0 with label keys, 16 / 32 / 0.3 / MIN_CELLS_UNLABELLED without, a query's by its
    reference's heads; a resumed run keeps its own (runs before these defaults: the standard normal prior, no floor,
    their saved size and weight)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from bigatlas.config import MIN_CELLS_UNLABELLED, DataConfig, ModelConfig, RunConfig, TrainConfig
    from bigatlas.rundir import RunDir
    from bigatlas.train import _resolved_by_labels

    def settings(cfg):
        return cfg.model.n_latent, cfg.model.prior_components, cfg.train.kl_weight, cfg.train.min_cells

    plain = RunConfig(data=DataConfig(data="x.zarr", batch_key="study"))
    labelled = replace(plain, data=replace(plain.data, label_keys=("cell_type",)))
    run = RunDir(tmp_path / "r")
    floor = MIN_CELLS_UNLABELLED
    assert settings(plain) == (None, None, None, None)
    assert settings(_resolved_by_labels(plain, run, False, None)) == (16, 32, 0.3, floor)
    assert settings(_resolved_by_labels(labelled, run, False, None)) == (10, 0, 0.1, 0)
    query = SimpleNamespace(reference=SimpleNamespace(vocab=SimpleNamespace(label_classes={"cell_type": ["a"]})))
    assert settings(_resolved_by_labels(plain, run, False, query)) == (10, 0, 0.1, 0)  # an unlabelled query: heads
    run.write_config(replace(plain, model=ModelConfig(n_latent=10), train=TrainConfig(kl_weight=0.1)))
    saved = json.loads(run.config_file.read_text())
    del saved["config"]["model"]["prior_components"]  # a run trained before the mixture prior
    del saved["config"]["train"]["min_cells"]  # ... and the floor
    run.config_file.write_text(json.dumps(saved))
    resumed = _resolved_by_labels(plain, run, True, None)
    assert settings(resumed) == (10, 0, 0.1, 0)
    run.check_resumable(resumed)
    assert settings(_resolved_by_labels(plain, run, False, None)) == (16, 32, 0.3, floor)  # a new run in that dir
    explicit = replace(
        plain, model=ModelConfig(n_latent=7, prior_components=4), train=TrainConfig(kl_weight=0.5, min_cells=9)
    )
    assert _resolved_by_labels(explicit, run, True, None) is explicit


def test_two_processes_partition_the_cells_and_agree(small_atlas, tmp_path):
    run = tmp_path / "ddp"
    drop = tmp_path / "drop.csv"  # every process drops the listed labels; the main one keeps the run's copy
    pd.DataFrame({"cell": [f"cell_{i}" for i in range(0, 2400, 8)]}).to_csv(drop, index=False)
    # BatchNorm: each rank gathers the statistics of the weight average over its own share, and the ranks must
    # still end with the same ones (the trace holds them beside the parameters)
    args = [*base_args(small_atlas, run), "--trace-cells", "--drop-labels", f"cell_type={drop}", "--norm", "batch"]
    run_train(args, launcher=accelerate_launcher(2))
    assert len(pd.read_csv(run / "dropped_labels" / "cell_type.csv")) == 300
    n = 2400
    train_cells = np.flatnonzero(~holdout_mask(np.arange(n), 0.05, 0))
    for epoch in range(2):
        parts = [np.load(run / "trace" / f"rank{r}_epoch{epoch}.npy") for r in range(2)]
        assert len(parts[0]) > 0 and len(parts[1]) > 0
        assert len(np.intersect1d(parts[0], parts[1])) == 0
        assert np.array_equal(np.sort(np.concatenate(parts)), train_cells)
    p0, p1 = (np.load(run / "trace" / f"rank{r}_params.npy") for r in range(2))
    assert np.array_equal(p0, p1)
    written = read_reference(run)  # built once, on the main process, from the final weights
    build_reference(run, umap=False, log=lambda *_: None)
    assert written is not None and read_reference(run).id == written.id
    one = tmp_path / "one"
    run_train([*base_args(small_atlas, one), "--trace-cells"])
    single = np.load(one / "trace" / "rank0_epoch0.npy")
    assert np.array_equal(np.sort(single), train_cells)


@pytest.mark.parametrize("model", [{}, {"batch_adversary": 5.0}, {"batch_align": 10.0}])
def test_training_steps_never_wait_on_the_device(small_atlas, tmp_path, monkeypatch, model):
    """No host sync inside a step: a tensor read to Python (bool, float, int, item, tolist, numpy)
    would stall a GPU every step. The loop reads its flags every SYNC_EVERY steps instead (_sync), and
    there once, whatever the number of loss terms (the batch adversary's and alignment's too)."""
    import torch

    from bigatlas.checkpoint import Progress
    from bigatlas.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from bigatlas.metrics_log import DeviceSums, MetricsLog, new_sums
    from bigatlas.train import _sync, make_accelerator, set_up, train_step

    cfg = RunConfig(
        model=ModelConfig(**model),
        train=TrainConfig(max_epochs=1, batch_size=64),
        data=DataConfig(data=small_atlas, batch_key="donor_id", label_keys=("cell_type",)),
    )
    s = set_up(cfg, tmp_path / "run", False, make_accelerator(cfg), None)
    inputs = [s.to_input(b) for _, b in zip(range(6), s.stream)]
    progress, sums = Progress(), DeviceSums()
    train_step(s, progress, inputs[0], 0.5, 1.0)  # first step: optimizer state is created
    reads, here = [], threading.get_ident()  # the stream's reader threads go on reading meanwhile: not counted
    for name in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            if threading.get_ident() == here:
                reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for inp in inputs[1:]:
        out = train_step(s, progress, inp, 0.5, 1.0)
        sums.add(out.terms, s.guard.stop)
    assert reads == [] and progress.step == 6
    # the loop's sync point reads the device once: the flags, the step's terms and the running sums together
    log, bar = MetricsLog(s.run, False), SimpleNamespace(set_postfix=lambda **k: bars.append(k))
    log.tb, bars, progress.sums = SimpleNamespace(add_scalar=lambda *a: logged.append(a)), [], new_sums()
    logged, progress.step = [], 50  # a step TensorBoard logs
    _sync(s, progress, sums, out.terms, 0.5, bar, log)
    monkeypatch.undo()
    assert reads == ["tolist"]
    assert progress.sums["n"] == sum(len(inp) - inp.val.sum() for inp in inputs[1:])
    assert bars[0]["loss"] == f"{float(out.terms['loss']):.4g}"
    assert {a[0] for a in logged} == {f"step/{k}" for k in out.terms} | {"step/kl_weight"}
    assert not s.preempt.agreed and s.guard.first_bad_step() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_steps_make_no_cuda_host_sync(small_atlas, tmp_path):
    """On a GPU: building each batch's input (its copies to the device included) and the step never make
    the host wait on the device (torch's sync debug mode raises on any synchronizing call)."""
    from bigatlas.checkpoint import Progress
    from bigatlas.config import DataConfig, RunConfig
    from bigatlas.metrics_log import DeviceSums
    from bigatlas.train import make_accelerator, set_up, train_step

    cfg = RunConfig(
        train=TrainConfig(max_epochs=1, batch_size=64),
        data=DataConfig(data=small_atlas, batch_key="donor_id", label_keys=("cell_type",)),
    )
    s = set_up(cfg, tmp_path / "run", False, make_accelerator(cfg), None)
    assert s.acc.device.type == "cuda"
    batches = [b for _, b in zip(range(6), s.stream)]
    progress, sums = Progress(), DeviceSums()
    train_step(s, progress, s.to_input(batches[0]), 0.5, 1.0)  # first step: optimizer state is created
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:
            out = train_step(s, progress, s.to_input(b), 0.5, 1.0)
            sums.add(out.terms, s.guard.stop)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert progress.step == 6


@pytest.mark.parametrize("bad", ["forced", "nan input"])
def test_nan_guard_freezes_the_model_on_the_device(bad):
    """After a flagged step the fused optimizer skips its update and BatchNorm statistics return to
    their last good values, with no host check in between (also from the NaN that a bad batch put into
    the running statistics)."""
    import torch

    from bigatlas.config import ModelConfig
    from bigatlas.distributions import Counts
    from bigatlas.guard import NanGuard
    from bigatlas.model import VAEModule

    torch.manual_seed(0)
    m = VAEModule(30, [3], [4], ModelConfig(norm="batch")).train()  # BatchNorm: statistics to put back
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)
    guard = NanGuard(m, opt, "cpu")
    assert guard.buffers
    x = torch.poisson(torch.rand(32, 30) * 3)
    codes, labels = torch.randint(0, 3, (32, 1)), torch.randint(0, 4, (32, 1))

    def step(i, forced=False):
        xi = x * (1 + i % 3)
        if i == 4 and bad == "nan input":
            xi[0, 0] = float("nan")
        out = m(Counts.from_dense(xi), codes, labels)
        guard.check(out.total, i, forced)
        out.total.backward()
        guard.step()
        opt.zero_grad(set_to_none=True)

    for i in range(1, 4):
        step(i)
    good = {k: v.clone() for k, v in m.state_dict().items()}
    step(4, forced=bad == "forced")
    step(5)
    step(6)
    assert guard.first_bad_step() == 4 and float(guard.stop) == 1.0
    for k, v in m.state_dict().items():
        assert torch.equal(v, good[k]), k
    assert all(int(s["step"]) == 3 for s in opt.state.values())


def test_world_size_mismatch_is_an_error(monkeypatch):
    from bigatlas.train import check_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="started 1 process"):
        check_world(1)
    check_world(2)


def test_learns_an_integrated_latent_space(tmp_path):
    import anndata as ad

    from bigatlas import AtlasVAE
    from bigatlas.metrics import embedding_scores, log1p_normalized, pca

    data, n = tmp_path / "atlas.zarr", 3000
    synth(data, n, 300, "zarr", seed=2)
    model = AtlasVAE.setup(
        str(data),
        batch_key="dataset_id",
        covariate_keys=["donor_id"],
        label_keys=["cell_type"],
        train={"max_epochs": 40},
    ).fit(tmp_path / "run")
    adata = ad.read_zarr(data)
    truth = adata.obs.true_cell_type.cat.codes.to_numpy()
    z = model.get_latent()
    assert z.shape == (n, model.config.model.n_latent) and np.isfinite(z).all()
    base_emb = pca(log1p_normalized(adata.X.toarray()), 10)
    for key in ("donor_id", "dataset_id"):  # donors within studies, and the strong study effect
        batches = adata.obs[key].cat.codes.to_numpy()
        vae, base = embedding_scores(z, truth, batches), embedding_scores(base_emb, truth, batches)
        assert vae["knn_label_accuracy"] > base["knn_label_accuracy"] + 0.05, (key, vae, base)
        assert vae["batch_mixing"] > base["batch_mixing"] + 0.1, (key, vae, base)
    pred = model.predict_labels()["cell_type"]
    val = holdout_mask(np.arange(n), 0.05, 0)
    labelled = (adata.obs.cell_type.astype(str) != "undefined").to_numpy()
    held = val & labelled
    acc = (pred["label"][held] == adata.obs.cell_type.astype(str).to_numpy()[held]).mean()
    assert acc >= 0.9, acc
    assert np.allclose(pred["probabilities"].sum(1), 1, atol=1e-5)
    loaded = AtlasVAE.load(tmp_path / "run")
    assert np.array_equal(loaded.get_latent(), z)
    assert (tmp_path / "run" / "loss_curves.png").exists()
    assert json.loads((tmp_path / "run" / "vocab.json").read_text())["genes"][0].startswith("ENSSYN")
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert 10 < len(rows) <= 41 and "val_loss" in rows[0]  # one row per epoch; early stopping may end it


def test_early_stopping_counts_epochs_without_improvement_after_the_warm_up():
    from bigatlas.checkpoint import Progress
    from bigatlas.config import TrainConfig
    from bigatlas.train import _early_stop

    def stop_epoch(losses, n_train=100, **kw):
        t, progress = TrainConfig(kl_warmup_epochs=3, **kw), Progress()
        for epoch, loss in enumerate(losses):
            progress.epoch = epoch
            if _early_stop(t, progress, loss, max_epochs=100, floor=t.floor_epochs(n_train)):
                return epoch
        return None

    flat_from_1 = [10.0, 9.0] + [9.5] * 20
    # epochs 1-2 are inside the warm-up (3 epochs): they do not count towards the patience of 4
    assert stop_epoch(flat_from_1, early_stopping_patience=4) == 6
    assert stop_epoch(flat_from_1, early_stopping_patience=None) is None
    creeping = [10.0 - 0.001 * i for i in range(30)]  # 0.01% per epoch: below a 0.1% min delta
    assert stop_epoch(creeping, early_stopping_patience=5) is None
    assert stop_epoch(creeping, early_stopping_patience=5, early_stopping_min_delta=1e-3) == 7
    # a floor: the stop waits for epoch 12 (the 12th epoch ends at index 11), then comes at once
    assert stop_epoch(flat_from_1, early_stopping_patience=4, min_epochs=12) == 11
    assert stop_epoch(flat_from_1, early_stopping_patience=4, min_epochs=30) is None  # 22 epochs: below the floor
    with pytest.raises(ValueError, match="min_epochs"):
        TrainConfig(min_epochs=-1)
    # a floor in cells: 1,101 training cells at 100 an epoch take 12 epochs; 1,100 take 11; the larger floor wins
    assert stop_epoch(flat_from_1, early_stopping_patience=4, min_cells=1101) == 11
    assert stop_epoch(flat_from_1, early_stopping_patience=4, min_cells=1100) == 10
    assert stop_epoch(flat_from_1, early_stopping_patience=4, min_cells=1100, min_epochs=12) == 11
    assert stop_epoch(flat_from_1, n_train=1000, early_stopping_patience=4, min_cells=1101) == 6  # 2 epochs
    with pytest.raises(ValueError, match="min_cells"):
        TrainConfig(min_cells=-1)
    # an improvement just before the floor restarts the count: 4 bad epochs after it (11-14), not the floor
    assert stop_epoch([10.0, 9.0] + [9.5] * 8 + [8.0] + [9.5] * 10, early_stopping_patience=4, min_epochs=12) == 14


def test_early_stopping_waits_for_the_floor_in_training_cells(small_atlas, tmp_path):
    """A relative min delta of 10 makes every epoch after the warm-up (1) a bad one: with a patience of 1 the run
    stops after 2 epochs, and with --min-cells of 3 epochs' training cells and one more, after 4; config.json
    records the floor (unset with label keys: none)."""
    n_train = int(np.count_nonzero(~holdout_mask(np.arange(2400), 0.05, 0)))
    args = ["--early-stopping-patience", "1", "--early-stopping-min-delta", "10", "--kl-warmup-epochs", "1"]
    for out, extra, epochs in (("plain", [], 2), ("floor", ["--min-cells", str(3 * n_train + 1)], 4)):
        run_train([*base_args(small_atlas, tmp_path / out, epochs=6), *args, *extra])
        assert len(list(csv.DictReader((tmp_path / out / "metrics.csv").open()))) == epochs, out
    saved = [json.loads((tmp_path / out / "config.json").read_text())["config"]["train"] for out in ("plain", "floor")]
    assert [c["min_cells"] for c in saved] == [0, 3 * n_train + 1]


def test_the_learning_rate_is_cut_every_patience_epochs_of_a_plateau():
    from bigatlas.checkpoint import Progress
    from bigatlas.config import TrainConfig
    from bigatlas.train import _early_stop, _lr_cut_due

    def cut_epochs(losses, **kw):
        t, progress, cuts = TrainConfig(kl_warmup_epochs=3, **kw), Progress(), []
        for epoch, loss in enumerate(losses):
            progress.epoch = epoch
            if _early_stop(t, progress, loss, max_epochs=100, floor=0):
                break
            if _lr_cut_due(t, progress, loss, max_epochs=100):
                cuts.append(epoch)
        return cuts

    flat_from_1 = [10.0, 9.0] + [9.5] * 20
    # bad epochs count from epoch 3 (after the warm-up): cuts after 2 and 4 of them, the stop at 5
    assert cut_epochs(flat_from_1, lr_plateau_patience=2, early_stopping_patience=5) == [4, 6]
    assert cut_epochs(flat_from_1, lr_plateau_patience=2, early_stopping_patience=0)[:3] == [4, 6, 8]
    assert cut_epochs(flat_from_1, early_stopping_patience=0) == []  # off by default
    # an improvement restarts the count: no cut until 3 bad epochs in a row again
    dip = [10.0, 9.0, 9.5, 9.5, 9.5, 8.0, 9.5, 9.5, 9.5, 9.5]
    assert cut_epochs(dip, lr_plateau_patience=3, early_stopping_patience=0) == [8]
    # a resume with a larger max_epochs lengthened the warm-up past 2 counted bad epochs: its epoch 2 is
    # warm-up again, leaves the count as it was, and cuts nothing
    t = TrainConfig(kl_warmup_epochs=3, lr_plateau_patience=2)
    progress = Progress(epoch=2, best_val=9.0, bad_epochs=2)
    assert not _early_stop(t, progress, 9.5, max_epochs=100, floor=0) and progress.bad_epochs == 2
    assert not _lr_cut_due(t, progress, 9.5, max_epochs=100)


def test_a_run_with_learning_rate_cuts_resumes_bit_identically(small_atlas, tmp_path):
    """A relative min delta of 10 makes every epoch after the warm-up (1 of 3) a plateau epoch: the rate
    halves after epochs 1 and 2, and a run killed in epoch 2 resumes at the cut rate."""
    args = ["--lr-plateau-patience", "1", "--early-stopping-patience", "0", "--early-stopping-min-delta", "10"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_train([*base_args(small_atlas, ref, epochs=3), *args])
    rows = list(csv.DictReader((ref / "metrics.csv").open()))
    lr = TrainConfig().lr
    assert [float(r["lr"]) for r in rows] == pytest.approx([lr, lr, lr / 2])
    res = run_train([*base_args(small_atlas, cut, epochs=3), *args], {"BIGATLAS_FAULT": "after_step:85"}, check=False)
    assert res.returncode == -9, res.stderr[-2000:]
    run_train([*base_args(small_atlas, cut, epochs=3), *args, "--resume"])
    a, b = weights(ref), weights(cut)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_the_likelihood_is_compiled_for_long_runs_only():
    """auto compiles where the compile time pays for itself (COMPILE_MIN_STEPS planned steps); a bad
    value is refused by name."""
    from bigatlas.config import COMPILE_MIN_STEPS, TrainConfig

    auto = TrainConfig()
    assert auto.compile_loss == "auto"
    assert not auto.compiles_loss(COMPILE_MIN_STEPS - 1) and auto.compiles_loss(COMPILE_MIN_STEPS)
    assert TrainConfig(compile_loss="on").compiles_loss(1)
    assert not TrainConfig(compile_loss="off").compiles_loss(10**9)
    with pytest.raises(ValueError, match="compile_loss must be one of auto, on, off, not 'yes'"):
        TrainConfig(compile_loss="yes")


def test_a_yes_no_option_must_be_a_boolean(tmp_path):
    """A config file's "false" is a string, which is truthy: every yes/no option of the three sections refuses a
    non-boolean by name (an unset batch_interaction, a run dir's null, stays allowed)."""
    import json

    from bigatlas.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    assert ModelConfig(batch_interaction=None).batch_interaction is None
    assert ModelConfig(batch_in_heads=True).batch_in_heads is True
    for section, name, cls in (
        ("model", "batch_in_heads", ModelConfig),
        ("model", "batch_interaction", ModelConfig),
        ("model", "batch_interaction_detach", ModelConfig),
        ("train", "reference_umap", TrainConfig),
        ("data", "allow_non_integer", DataConfig),
    ):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({section: {name: "false"}}))
        with pytest.raises(ValueError, match=f"{cls.__name__}.{name} must be true or false.*not 'false'"):
            RunConfig.from_file(path)
        with pytest.raises(ValueError, match=f"{cls.__name__}.{name} must be"):
            cls(**{name: 1})


def test_optimizer_steps_with_the_configured_epsilon():
    """The first AdamW step moves a parameter by lr · g / (|g| + eps): eps is the config's, not torch's."""
    import torch

    from bigatlas.config import TrainConfig
    from bigatlas.optim import make_optimizer

    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer([p], TrainConfig(lr=0.3, weight_decay=0.0, adam_eps=0.05))
    p.grad = torch.tensor([0.01, -0.02, 0.0])
    opt.step()
    expected = -0.3 * p.grad / (p.grad.abs() + 0.05)
    assert torch.allclose(p.detach(), expected, atol=1e-7)
    assert abs(float(p.detach()[0]) + 0.05) < 1e-6  # with torch's 1e-8 it would be -0.3


@pytest.mark.parametrize("every,start", [(1, 0), (3, 0), (3, 10)])
def test_weight_average_follows_its_recurrence_and_skips_guarded_steps(tmp_path, every, start):
    """At steps t that are multiples of `every` (n = (t - start) / every): s = d s + (1 - d) p_t with
    d = min(decay^every, (1 + n) / (2 + n)), and d = 0 up to step `start` (the average begins after it); other
    steps leave it; a step the NaN guard flagged leaves it; a checkpoint round trip restores it and its start
    exactly."""
    import torch

    from bigatlas.ema import WeightAverage

    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    avg = WeightAverage(m, 0.9, every, start)
    expect = [p.detach().clone().double() for p in m.parameters()]
    for t in range(1, 40):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        skipped = t == 18
        avg.update(t, torch.tensor(1.0 if skipped else 0.0))
        if not skipped and t % every == 0:
            n = (t - start) // every
            d = 0.0 if t <= start else min(0.9**every, (1 + n) / (2 + n))
            expect = [d * e + (1 - d) * p.detach().double() for e, p in zip(expect, m.parameters())]
        if t <= start and t % every == 0:  # the weights of the steps before leave no trace
            assert all(torch.allclose(s, p.detach(), atol=1e-6) for s, p in zip(avg.shadow, m.parameters()))
    for s, e in zip(avg.shadow, expect):
        assert torch.allclose(s.double(), e, atol=1e-5)
    assert not torch.allclose(avg.shadow[0], m.weight.detach())  # an average, not the last weights
    avg.save(tmp_path)
    other = WeightAverage(m, 0.9, every)
    other.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(avg.shadow, other.shadow))
    assert other.start == start and other.decay_at(39 // every * every) == avg.decay_at(39 // every * every)
    other.copy_to_model()
    assert torch.equal(m.weight.detach(), avg.shadow[0])
    with torch.no_grad():
        m.weight.add_(1.0)
    with pytest.warns(UserWarning, match="no bigatlas_weight_average.safetensors"):
        other.load(tmp_path / "missing")  # a checkpoint from before the average: restarts at the weights
    assert torch.equal(other.shadow[0], m.weight.detach())


@pytest.mark.parametrize("decay", ["0.99", "0"])
def test_the_run_writes_the_weight_average(small_atlas, tmp_path, decay):
    """model.safetensors holds the average the last checkpoint carries (the last step's weights stay in
    the checkpoint); with --ema-decay 0 it holds the last step's weights."""
    from bigatlas.ema import FILE

    run = tmp_path / "r"
    run_train([*base_args(small_atlas, run), "--ema-decay", decay])
    final = weights(run)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    last = load_file(str(ckpt / "model.safetensors"))
    stats = ("running_mean", "running_var", "num_batches_tracked", "class_weight_0")
    params = [k for k in final if not k.endswith(stats)]
    assert all(np.array_equal(final[k], last[k]) for k in final if k.endswith(stats))
    if decay == "0":
        assert not (ckpt / FILE).exists()
        assert all(np.array_equal(final[k], last[k]) for k in params)
        return
    average = load_file(str(ckpt / FILE))
    assert sorted(average) == sorted(params)
    for k in params:
        assert np.array_equal(final[k], average[k]), k
    assert not np.array_equal(final["z_mean.weight"], last["z_mean.weight"])


def test_grad_norm_is_the_norm_of_all_gradients_together():
    """grad_norm (dots for the large gradients on the CPU, one foreach call for the small ones) is the
    2-norm of every gradient's values concatenated, with only large, only small and both kinds."""
    from bigatlas.optim import DOT_MIN, grad_norm

    g = torch.Generator().manual_seed(0)
    large = [torch.randn(DOT_MIN // 16, 16, generator=g) * 3.0, torch.randn(DOT_MIN + 7, generator=g)]
    small = [torch.randn(5, generator=g) * 100.0, torch.randn(3, 4, generator=g)]
    for grads in (large, small, large + small, [large[0].t()]):  # the last: a non-contiguous gradient
        want = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in grads]).double())
        torch.testing.assert_close(grad_norm(grads).double(), want, rtol=1e-6, atol=0.0)
    assert float(grad_norm([])) == 0.0


def test_clipping_through_the_fused_optimizer_makes_the_update_of_clip_grad_norm():
    """clip_gradients hands a fused AdamW the clip factor as its grad_scale instead of scaling the
    gradients: the weights after the step must be those of torch's clip_grad_norm_ then the step, with
    the clip active (norm above the limit) and not."""
    from bigatlas.config import TrainConfig
    from bigatlas.optim import clip_gradients, make_optimizer

    def stepped(clip, max_norm, scale):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
        opt = make_optimizer(model.parameters(), TrainConfig())
        for _ in range(3):
            (scale * model(torch.randn(4, 6)).pow(2).sum()).backward()
            clip(list(model.parameters()), opt, max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return torch.cat([p.detach().ravel() for p in model.parameters()])

    def torch_clip(params, opt, max_norm):
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    if not make_optimizer([torch.nn.Parameter(torch.ones(1))], TrainConfig()).defaults.get("fused"):
        pytest.skip("this torch has no fused AdamW: clip_gradients is clip_grad_norm_ itself")
    for scale in (1e3, 1e-3):  # gradient norms far above and far below the limit
        ours, theirs = stepped(clip_gradients, 1.0, scale), stepped(torch_clip, 1.0, scale)
        unclipped = stepped(lambda *a: None, 1.0, scale)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
        assert (scale > 1) == (not torch.allclose(ours, unclipped))  # the clip acted exactly when it should


def test_training_flushes_subnormal_floats_and_restores_the_default_after(small_atlas, tmp_path, monkeypatch):
    """Subnormal arithmetic is ~100x slower on CPUs: the run flushes such values to zero while it trains
    (a LayerNorm run lost a third of its speed after the first epoch without it) and leaves the process as
    it found it."""
    import bigatlas.train as T
    from bigatlas.config import DataConfig, RunConfig, TrainConfig

    tiny = torch.tensor([1e-39])  # subnormal in float32
    seen, step = [], T.train_step

    def recording(*a, **k):
        seen.append(float((tiny * 1.0)[0]))
        return step(*a, **k)

    monkeypatch.setattr(T, "train_step", recording)
    cfg = RunConfig(
        train=TrainConfig(max_epochs=1, batch_size=256, reference_cells=0),
        data=DataConfig(data=small_atlas, batch_key="donor_id"),
    )
    T.train(cfg, tmp_path / "run")
    if not torch.set_flush_denormal(False):  # this CPU cannot flush: nothing to check
        pytest.skip("no flush-to-zero on this CPU")
    assert seen and all(v == 0.0 for v in seen)
    assert float((tiny * 1.0)[0]) > 0  # the default again after the run
    torch.set_flush_denormal(True)  # a process that flushes already keeps flushing after a run
    try:
        with T.flush_denormals():
            pass
        assert float((tiny * 1.0)[0]) == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_a_run_from_before_the_unmeasured_gene_list_keeps_reading_missing_genes_as_zeros(tmp_path):
    """A vocab.json without `unmeasured_genes`: an outer-join run's encoder learnt every missing gene as zero, so
    all its genes are read as zeros (never filled); another run has none, and a run that has the list keeps it."""
    from bigatlas.config import DataConfig, RunConfig
    from bigatlas.rundir import RunDir
    from bigatlas.vocab import Vocab

    for join, want in (("outer", ["g0", "g1", "g2"]), ("inner", [])):
        run = RunDir(tmp_path / join)
        run.write_config(RunConfig(data=DataConfig(data="x.zarr", batch_key="study", gene_join=join)))
        run.write_vocab(Vocab(["g0", "g1", "g2"], {"study": ["a"]}, {}, {}, ["g1"]))
        assert run.read_vocab().unmeasured_genes == ["g1"]
        saved = json.loads(run.vocab_file.read_text())
        del saved["unmeasured_genes"]
        run.vocab_file.write_text(json.dumps(saved))
        assert run.read_vocab().unmeasured_genes == want


def test_a_resumed_runs_metrics_file_keeps_its_columns(tmp_path):
    """metrics.csv written before a column was added (the batch adversary's) gets its next rows under its own
    header, each value under its name, not shifted by the new column."""
    from bigatlas.metrics_log import FIELDS, MetricsLog
    from bigatlas.rundir import RunDir

    old = [f for f in FIELDS if "adversary" not in f]
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    (run.path / "metrics.csv").write_text(",".join(old) + "\n")
    log = MetricsLog(run, True)
    log.tb = None
    log.epoch({"epoch": 3, "step": 30, "loss": 1.5, "adversary": 0.7, "val_loss": 2.5, "cells_per_s": 10})
    rows = list(csv.DictReader((run.path / "metrics.csv").open()))
    assert list(rows[0]) == old and rows[0]["val_loss"] == "2.5" and rows[0]["loss"] == "1.5"
    new = RunDir(tmp_path / "n")
    new.path.mkdir()
    fresh = MetricsLog(new, True)
    fresh.tb = None
    fresh.epoch({"epoch": 0, "step": 1, "loss": 1.0, "adversary": 0.7, "cells_per_s": 1})
    assert next(csv.DictReader((new.path / "metrics.csv").open()))["adversary"] == "0.7"


def test_an_unset_weight_average_is_the_labelled_or_unlabelled_default_and_a_resumed_run_keeps_its_own(tmp_path):
    """Unset, the decay is 0.9997 with label keys and 0.999 without; a run dir saved with another (a labelled
    run from before the longer default) resumes with its own, so the resume check does not refuse it."""
    from dataclasses import replace

    from bigatlas.config import DataConfig, RunConfig
    from bigatlas.rundir import RunDir
    from bigatlas.train import _resolved_average

    labelled = RunConfig(data=DataConfig(data="x.zarr", label_keys=("cell_type",)))
    unlabelled = replace(labelled, data=replace(labelled.data, label_keys=()))
    run = RunDir(tmp_path / "run")
    assert _resolved_average(labelled, run, resume=False).train.ema_decay == 0.9997
    assert _resolved_average(unlabelled, run, resume=False).train.ema_decay == 0.999
    run.write_config(replace(labelled, train=replace(labelled.train, ema_decay=0.999)))
    assert _resolved_average(labelled, run, resume=True).train.ema_decay == 0.999
    assert _resolved_average(labelled, run, resume=False).train.ema_decay == 0.9997  # a fresh run: the default
    set_value = replace(labelled, train=replace(labelled.train, ema_decay=0.5))
    assert _resolved_average(set_value, run, resume=True).train.ema_decay == 0.5


def test_an_unset_weight_average_spans_the_same_cells_at_any_batch_size_and_number_of_processes(tmp_path):
    """At k times 128 cells a step (a larger batch, or k processes) the unset decay is the default's to the k:
    after n steps of 128k cells the average keeps the weight the default keeps after nk steps of 128. A set
    decay is used as it is, whatever the batch."""
    from dataclasses import replace

    from bigatlas.config import DataConfig, RunConfig, TrainConfig
    from bigatlas.rundir import RunDir
    from bigatlas.train import _resolved_average

    for labelled, base in ((True, 0.9997), (False, 0.999)):
        for batch, processes in ((128, 1), (1024, 1), (2048, 1), (256, 4), (64, 1)):
            k = batch * processes / 128
            d = TrainConfig(batch_size=batch).average_decay(labelled, processes)
            assert d == pytest.approx(base**k, abs=1e-6)
            assert d**1000 == pytest.approx(base ** (1000 * k), rel=1e-3)  # the same cells' weight
    assert TrainConfig(batch_size=1024).average_decay(True) != TrainConfig(batch_size=1024).average_decay(False)
    cfg = RunConfig(data=DataConfig(data="x.zarr", label_keys=("cell_type",)), train=TrainConfig(batch_size=1024))
    run = RunDir(tmp_path / "run")
    assert _resolved_average(cfg, run, resume=False, processes=2).train.ema_decay == round(0.9997**16, 6)
    set_value = replace(cfg, train=replace(cfg.train, ema_decay=0.999))
    assert _resolved_average(set_value, run, resume=False, processes=2).train.ema_decay == 0.999


def test_an_average_from_the_warm_up_begins_where_the_kl_weight_reaches_its_value():
    """--ema-start warmup: the average begins at the step where the KL warm-up ends (its weight full there,
    below it a step before), at most half the run as the warm-up is; run: at the first step."""
    from bigatlas.config import TrainConfig
    from bigatlas.train import loss_weights

    for epochs, steps in ((400, 6), (30, 57), (4, 20), (1, 13)):
        t = TrainConfig(ema_start="warmup", kl_warmup_epochs=10, kl_weight=0.3)
        start = t.average_start(epochs, steps)
        assert 0 < start < epochs * steps / 2 + 1
        assert loss_weights(t, 0, start / steps, epochs)[0] == pytest.approx(t.kl_weight)
        assert loss_weights(t, 0, (start - 1) / steps, epochs)[0] < t.kl_weight
        assert TrainConfig(ema_start="run").average_start(epochs, steps) == 0
    with pytest.raises(ValueError, match="ema_start"):
        TrainConfig(ema_start="later")


def test_the_written_batch_norm_statistics_belong_to_the_written_weights(small_atlas, tmp_path):
    """Without label keys (BatchNorm and a weight average): with --norm-refresh-cells of one epoch's cells in
    minibatches of one size (2,400 = 30 × 80), the encoder's first BatchNorm holds its input's mean over every
    cell for the written (averaged) weights; with 0 it holds the last steps' own weights' running mean, which is
    not that. The parameters are the same either way."""
    import anndata

    x = anndata.read_zarr(small_atlas).X
    x = np.log1p(np.asarray(x.todense() if hasattr(x, "todense") else x, dtype=np.float64))
    args = ["--data", small_atlas, "--batch-key", "donor_id", "--max-epochs", "2", "--batch-size", "80"]
    error, written = {}, {}
    for out, cells in (("refresh", 2400), ("kept", 0)):
        run_train([*args, "--out", str(tmp_path / out), "--norm-refresh-cells", str(cells)])
        w = written[out] = weights(tmp_path / out)
        h = x @ w["encoder.0.weight"].T.astype(np.float64) + w["encoder.0.bias"]
        error[out] = np.abs(w["encoder.1.running_mean"] - h.mean(0)).max() / h.std(0).mean()
    assert error["refresh"] < 1e-4 < 1e-2 < error["kept"], error
    for k, v in written["kept"].items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            np.testing.assert_array_equal(written["refresh"][k], v, err_msg=k)
