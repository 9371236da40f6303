"""Every user error reaches the terminal as one line naming the problem: exit code 2, no traceback,
and no output left behind."""

from pathlib import Path

import pytest
from conftest import cli, write_position_store

from bigatlas.synth import synth


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    synth(root / "a.zarr", 300, 40, "zarr", seed=3, n_studies=2, donors_per_study=2)
    write_position_store(root / "one.zarr", "zarr", n_obs=1)
    (root / "bad.toml").write_text("[train]\nlearning_rate = 0.1\n")
    (root / "genes.csv").write_text(",0\n0,ENSSYN00000000001\n1,ENSSYN00000000002\n")  # pd.Series.to_csv's
    return root


def train(*extra):
    return ["train", "--batch-key", "dataset_id", "--max-steps", "1", *extra]


CASES = {  # name: (args with {root}, extra env, fragment of the one error line)
    "obs key": (train("--data", "{root}/a.zarr", "--out", "{out}", "--batch-key", "donr_id"), {},
                "obs column 'donr_id' not in store {root}/a.zarr (did you mean 'donor_id'? have: donor_id, "),
    "genes file": (train("--data", "{root}/a.zarr", "--out", "{out}", "--genes", "{root}/nope.txt"), {},
                   "No such file or directory"),
    "genes table": (train("--data", "{root}/a.zarr", "--out", "{out}", "--genes", "{root}/genes.csv"), {},
                    "gene list {root}/genes.csv holds a table (line ',0'); write one feature id or name per line"),
    "filter column": (train("--data", "{root}/a.zarr", "--out", "{out}", "--obs-filter", "tissue == 'x'"), {},
                      "names obs column 'tissue'"),
    "filter syntax": (train("--data", "{root}/a.zarr", "--out", "{out}", "--obs-filter", "dataset_id =="), {},
                      "obs_filter 'dataset_id ==' failed"),
    "store too small": (train("--data", "{root}/one.zarr", "--out", "{out}", "--batch-key", "donor_id"), {},
                        "too few to train"),
    "launch env": (train("--data", "{root}/a.zarr", "--out", "{out}"), {"WORLD_SIZE": "2"}, "MASTER_ADDR"),
    "no data": (["train", "--batch-key", "b", "--out", "{out}"], {}, "--data is required"),
    "config option": (train("--data", "{root}/a.zarr", "--out", "{out}", "--config", "{root}/bad.toml"), {},
                      "unknown TrainConfig option(s) ['learning_rate']"),
    "embed run": (["embed", "--run", "{root}", "--data", "{root}/a.zarr", "--out", "{out}"], {},
                  "is not a trained run dir: config.json is missing"),
    "embed data": (["embed", "--run", "{root}", "--data", "{root}/nope.zarr", "--out", "{out}"], {},
                   "is not a trained run dir"),
    "evaluate": (["evaluate", "--emb", "{root}/nope.zarr", "--label-keys", "c", "--batch-key", "b"], {},
                 "does not exist"),
    "prepare": (["prepare", "--data", "{root}/nope.zarr", "--out", "{out}"], {}, "does not exist"),
    "stream": (["stream", "--data", "{root}/nope.zarr"], {}, "store {root}/nope.zarr does not exist"),
    "map-query": (["map-query", "--run", "{root}", "--data", "{root}/a.zarr", "--out", "{out}"], {},
                  "is not a trained run dir"),
    "embed to .h5ad": (["embed", "--run", "{root}", "--data", "{root}/a.zarr", "--out", "{root}/e.h5ad"], {},
                       "{root}/e.h5ad: the embedding is a folder (AnnData-Zarr or SOMA, written in chunks), not a "
                       ".h5ad file; name it e.zarr (anndata.read_zarr opens it"),
    "convert to .h5ad": (["prepare", "--data", "{root}/a.zarr", "--out", "{out}", "--convert", "{root}/c.h5ad"], {},
                         "{root}/c.h5ad: the store is a folder"),
    "synth exists": (["synth", "--out", "{root}/a.zarr", "--cells", "10"], {}, "exists"),
    "stream without data": (["stream", "--batch-size", "8"], {}, "--data is required"),
    "two data": (["prepare", "{root}/a.zarr", "--data", "{root}/b.zarr", "--out", "{out}"], {}, "two data given"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line(stores, tmp_path, case):
    args, env, fragment = CASES[case]
    out = tmp_path / "out"
    fill = {"root": str(stores), "out": str(out)}
    res = cli([a.format(**fill) for a in args], env_extra=env, timeout=300)
    command = args[0]
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith(f"bigatlas {command}: error: ")]
    assert len(errors) == 1 and fragment.format(**fill) in errors[0], res.stderr[-3000:]
    assert not (out / "model.safetensors").exists() and not Path(str(out) + "/zarr.json").exists()
    assert not list(stores.glob("*.h5ad*"))  # nothing under a single file's name


def test_accelerate_cpu_with_two_processes_is_one_line(stores, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: refused before anything is written.
    (--quiet keeps accelerate's own CalledProcessError traceback of the failed child out of the way.)"""
    import sys

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--cpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m", "bigatlas.cli"]  # fmt: skip
    out = tmp_path / "out"
    res = cli(train("--data", f"{stores}/a.zarr", "--out", str(out)), launcher=launcher, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("bigatlas train: error: ")]
    assert len(errors) == 1 and "2 processes were asked for but Accelerate started 1 process" in errors[0]
    assert not out.exists()
