# The two commands a fresh machine needs: `make install` then `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
NLTK_DATA ?= $(abspath ../shared/nltk_data)
export NLTK_DATA
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

.PHONY: install test test-slow lint format demo bench clean check-nltk-data

# The tests need NLTK's tagger (SimZSS concepts): stop at once, with one line, if it is not there.
check-nltk-data:
	@test -d "$(NLTK_DATA)" || { echo "make: error: NLTK_DATA=$(NLTK_DATA) does not exist (NLTK's tagger for the tests); set NLTK_DATA=/path/to/nltk_data or put shared/nltk_data next to the repository" >&2; exit 1; }

install: $(BIN)/ovseg

# torch's CUDA build makes the venv about 6.2 GB: with less room than MIN_FREE_GB, stop before pip
# half-installs it (pip's own error comes after minutes and leaves a broken .venv behind)
MIN_FREE_GB ?= 7

$(BIN)/ovseg: pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || { \
	  free=$$(df -Pk "$(dir $(abspath $(VENV)))" | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  if [ "$$free" -lt "$(MIN_FREE_GB)" ]; then \
	    echo "make: error: $(dir $(abspath $(VENV))) has $$free GB free; the venv needs about 6.2 GB (torch's CUDA build)." \
	         "Free some space, or put the venv elsewhere (make install VENV=/path/.venv), or set MIN_FREE_GB=0 to try anyway" >&2; \
	    exit 1; \
	  fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch/torchvision come from the local wheel cache where the machine has one (pinned pair)
	$(BIN)/pip install "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install torch torchvision
	$(BIN)/pip install -e ".[dev,app]"
	touch $@

test: check-nltk-data install lint
	$(BIN)/pytest -q -p no:cacheprovider

# ruff (configured in pyproject.toml): lint and formatting are part of `make test`; `make format` fixes both
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-slow: check-nltk-data install
	$(BIN)/pytest -q -p no:cacheprovider -m slow

demo: install
	$(BIN)/python -m ovseg.demo

bench: install
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache
