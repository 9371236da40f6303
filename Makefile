# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch below 2.14 resolves to the CPU wheel on CPU-only build hosts and to the regular PyPI build
# elsewhere; override with e.g. TORCH=torch to take your platform's newest build.
TORCH ?= torch>=2.3,<2.14
DEMO ?= demo
# processes for the demo's training run (gloo on CPU, one per GPU elsewhere)
DEMO_PROCS ?= 2
LAUNCH := $(BIN)/accelerate launch --num_machines 1 --mixed_precision no --dynamo_backend no \
	$(if $(filter 1,$(DEMO_PROCS)),--num_processes 1,--multi_gpu --num_processes $(DEMO_PROCS))

.PHONY: install demo test clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/bigatlas synth $(DEMO)/atlas.zarr --cells 20000 --genes 1000 --format zarr --seed 0 --overwrite
	$(BIN)/bigatlas stream $(DEMO)/atlas.zarr --batch-size 512 --epochs 1 --obs-keys cell_type donor_id
	rm -rf $(DEMO)/run $(DEMO)/query_embedding.zarr
	$(LAUNCH) scripts/train.py --data $(DEMO)/atlas.zarr --batch-key dataset_id --covariate-keys donor_id \
		--label-keys cell_type cell_type_coarse --obs-filter "dataset_id != 'study_5'" \
		--out $(DEMO)/run --max-epochs 15
	@echo "loss curves: $(DEMO)/run/loss_curves.png   metrics: $(DEMO)/run/metrics.csv"
	$(LAUNCH) scripts/embed.py --run $(DEMO)/run --data $(DEMO)/atlas.zarr --obs-filter "dataset_id == 'study_5'" \
		--out $(DEMO)/query_embedding.zarr --chunk-size 1024
	$(BIN)/python -c "import anndata as ad, numpy as np; q = ad.read_zarr('$(DEMO)/query_embedding.zarr'); \
		t = ad.read_zarr('$(DEMO)/atlas.zarr'); t = t[t.obs.dataset_id == 'study_5']; print(q); \
		print('held-out study: cell_type accuracy vs truth %.3f' % np.mean(q.obs.cell_type_pred.astype(str).values == t.obs.true_cell_type.astype(str).values))"

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO)
