# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch below 2.14 resolves to the CPU wheel on CPU-only build hosts and to the regular PyPI build
# elsewhere; override with e.g. TORCH=torch to take your platform's newest build.
TORCH ?= torch>=2.3,<2.14
DEMO ?= demo

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
	$(BIN)/bigatlas stream $(DEMO)/atlas.zarr --batch-size 512 --epochs 2 --obs-keys cell_type donor_id

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO)
