# The two commands a fresh machine needs: `make install` then `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
NLTK_DATA ?= $(abspath ../shared/nltk_data)
export NLTK_DATA
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: install test test-slow demo bench clean

install: $(BIN)/ovseg

$(BIN)/ovseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch/torchvision come from the local wheel cache where the machine has one (pinned pair)
	$(BIN)/pip install "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install torch torchvision
	$(BIN)/pip install -e ".[dev,app]"
	touch $@

test: install
	$(BIN)/pytest -q -p no:cacheprovider

test-slow: install
	$(BIN)/pytest -q -p no:cacheprovider -m slow

demo: install
	$(BIN)/python -m ovseg.demo

bench: install
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache
