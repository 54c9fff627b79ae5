# Two commands set up a fresh machine: `make repro` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export TF_CPP_MIN_LOG_LEVEL ?= 2
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test benchmark mlflow-ui clean

install: $(STAMP)

# Reinstall only when the dependency declarations change (idempotent).
$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements-lock.txt -e ".[pipeline,dev]"
	touch $(STAMP)

repro: install
	$(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

benchmark: install  # needs `make repro` first for the tiled and int8 ones (a trained model, data)
	$(BIN)/python benchmarks/repro_time.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/tiled_inference.py
	$(BIN)/python benchmarks/space_to_depth.py
	$(BIN)/python benchmarks/int8_variants.py
	$(BIN)/python benchmarks/batch_engines.py
	$(BIN)/python benchmarks/volume_tkv.py
	$(BIN)/python benchmarks/make_test_time.py

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db

clean:
	rm -rf $(VENV) .pytest_cache
