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
	$(BIN)/python -m pip install -q -e ".[all,bench,test]"
	touch $@

# The newcomer path: a Census-like SOMA slice → prepare (filter, convert to Zarr, HVGs) → 2-process
# training without one study → embedding of every cell → evaluation report (the held-out study shows
# how a new query maps).
demo: install
	$(BIN)/bigatlas synth --out $(DEMO)/census_slice --cells 20000 --genes 1000 --format soma --seed 0 --overwrite
	$(BIN)/bigatlas prepare --data $(DEMO)/census_slice --obs-filter "is_primary_data == True" \
		--convert $(DEMO)/atlas.zarr --overwrite --out $(DEMO)/prepare --batch-key dataset_id \
		--label-keys cell_type cell_type_coarse --n-top-genes 600
	$(BIN)/bigatlas stream --data $(DEMO)/atlas.zarr --batch-size 512 --epochs 1 --obs-keys cell_type donor_id
	rm -rf $(DEMO)/run $(DEMO)/embedding.zarr
	$(LAUNCH) -m bigatlas.train --data $(DEMO)/atlas.zarr --genes $(DEMO)/prepare/hvg.txt --batch-key dataset_id \
		--covariate-keys donor_id --label-keys cell_type cell_type_coarse --obs-filter "dataset_id != 'study_5'" \
		--out $(DEMO)/run --max-epochs 15
	$(LAUNCH) -m bigatlas embed --run $(DEMO)/run --data $(DEMO)/atlas.zarr --out $(DEMO)/embedding.zarr \
		--chunk-size 2048
	$(BIN)/bigatlas evaluate --emb $(DEMO)/embedding.zarr --label-keys cell_type --batch-key dataset_id \
		--truth-keys true_cell_type
	@$(BIN)/python -c "import json; m = json.load(open('$(DEMO)/run/report/metrics.json')); \
		s = m['scores']; p = m['predictions']['cell_type_pred vs true_cell_type']; \
		print('scIB total: bigatlas %.3f, PCA of counts %.3f' % (s['bigatlas']['total'], s['pca_baseline']['total'])); \
		print('cell_type accuracy vs truth: all %.3f, query study_5 (not trained on) %.3f' % (p['accuracy'], p['query_accuracy'])); \
		t = m['label_transfer']['cell_type_pred vs true_cell_type']; \
		print('label transfer: accuracy %.3f (head %.3f, the default; kNN %.3f); ECE %.3f; AURC %.4f; Unknown %.1f%% of cells, the rest %.3f accurate' % \
			(t['chosen']['accuracy'], t['head']['accuracy'], t['knn']['accuracy'], t['ece'], t['aurc'], 100 * t['unknown_fraction'], t['accuracy_not_unknown']))"
	@echo "report: $(DEMO)/run/report/report.html  (also report.md; metrics.json, PNGs beside it;"
	@echo "        reference_umap.png: every cell placed on the reference UMAP, by prediction and uncertainty)"
	@echo "The demo atlas is easy. On the hard ones (python -m bench.quality; 8,000 cells), the defaults beside scVI / scANVI"
	@echo "at their own epoch rule on the same cells and seeds (every screen behind them in docs/quality.md). Without label"
	@echo "keys (mog32kl3: the defaults, the mixture prior with KL weight 0.3; rerun: the defaults before it):"
	@$(BIN)/python -m bench.quality --table --own-rule --out bench/results/mixture_prior.json --tags mog32kl3 rerun --only bigatlas scvi
	@echo "On 700 real cells in 3 studies (pbmc; refresh: the defaults, which train such a small atlas every epoch of the rule"
	@echo "and gather BatchNorm statistics for the weight average; mixture_rerun: the defaults before the floor):"
	@$(BIN)/python -m bench.quality --table --own-rule --out bench/results/pbmc.json --tags refresh mixture_rerun --only bigatlas scvi
	@echo "With label keys (ema9997: the defaults, the longer weight average of 2026-12-06 included):"
	@$(BIN)/python -m bench.quality --table --own-rule --out bench/results/detached.json --tags ema9997 --only bigatlas_labels scanvi

# test processes (pytest-xdist): each runs whole files on one thread, the longest files first (tests/conftest.py)
TEST_WORKERS ?= auto

# lint and format check first (seconds), then the suite
test: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

clean:
	rm -rf $(VENV) $(DEMO)
