# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,openvino,ray,tflite]'
	# torchattacks is a benchmark/oracle dependency only; --no-deps: it lists torchvision, which we never import
	$(BIN)/pip install -q --no-deps torchattacks==3.5.1
	# the reference APGD (Croce & Hein's AutoAttack code on PyPI), for benchmarks/attack_speed.py only
	$(BIN)/pip install -q --no-deps pyautoattack==0.2.0
	# h5py reads the published verification benchmark's Keras weights (benchmarks/qnn_verification.py only)
	$(BIN)/pip install -q h5py==3.16.0
	touch $(STAMP)

.PHONY: install demo test lint
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qrobust demo --out runs/demo

test: $(STAMP)
	# two workers: tests pin torch to one thread each (tests/conftest.py), CI has 2 cores
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
