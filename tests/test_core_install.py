"""The core install (no extras) trains, embeds and streams; a command that needs an extra says which
one in one line. The extras are hidden from a fresh interpreter by an import blocker, so the test
sees what `pip install bigatlas` without extras would."""

import subprocess
import sys

from conftest import ROOT

# umap-learn (with numba, pynndescent, scikit-learn) is core: the reference UMAP of label transfer
EXTRAS = ("scib_metrics", "scanpy", "cellxgene_census", "jax", "tensorboard")

SCRIPT = """
import sys
for name in {blocked!r}:  # None in sys.modules: import fails, importlib.util.find_spec says absent
    sys.modules[name] = None
from bigatlas.cli import main

root = sys.argv[1]
codes = [
    main(["synth", "--out", root + "/a.zarr", "--cells", "900", "--genes", "60"]),
    main(["stream", "--data", root + "/a.zarr", "--batch-size", "128"]),
    main(["train", "--data", root + "/a.zarr", "--batch-key", "dataset_id", "--label-keys", "cell_type",
          "--out", root + "/run", "--max-epochs", "2"]),
    main(["embed", "--run", root + "/run", "--data", root + "/a.zarr", "--out", root + "/e.zarr"]),
    main(["evaluate", "--emb", root + "/e.zarr", "--label-keys", "cell_type", "--batch-key", "dataset_id"]),
    main(["stream", "--data", "census:2025-01-30"]),
]
print("CODES", codes)
print("LOADED", sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in {blocked!r}))
"""


def test_core_trains_and_embeds_and_names_the_missing_extra(tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(blocked=set(EXTRAS)), str(tmp_path)],
        cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert "CODES [0, 0, 0, 0, 2, 2]" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]
    assert "LOADED []" in res.stdout
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert errors == [
        "bigatlas evaluate: error: bigatlas evaluate needs scib-metrics: pip install 'bigatlas[evaluate]'",
        "bigatlas stream: error: census:2025-01-30/homo_sapiens needs the cellxgene-census package: "
        "pip install 'bigatlas[census]'",
    ], res.stderr[-3000:]
    assert "pip install 'bigatlas[tensorboard]'" in res.stdout
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert (tmp_path / "run" / "reference" / "index.safetensors").exists()  # with its UMAP: core too
