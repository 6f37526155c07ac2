# Fresh machine: `make train` (the embedded default) or `make test`. Both install first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install train test test-all lint clean

install: $(STAMP)

# The CPU torch pin goes in first so nothing later can pull a CUDA build.
$(STAMP): pyproject.toml requirements/dev-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev-cpu.txt
	$(BIN)/pip install --quiet -c requirements/dev-cpu.txt -e '.[dev]'
	touch $(STAMP)

train: install
	$(BIN)/vlmtrain recipe=tiny run_name=tiny

test: install
	$(BIN)/pytest -q -m "not slow and not gpu"

test-all: install
	$(BIN)/pytest -q -m "not gpu"

lint: install
	$(BIN)/ruff check vlmtrain tests scripts
	$(BIN)/ruff format --check vlmtrain tests scripts

clean:
	rm -rf $(VENV) .cache
