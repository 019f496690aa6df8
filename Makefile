# tdabench: `make run` installs (first time) and runs the whole study; `make test` runs the tests.
# Variables: PYTHON (interpreter for the venv), TORCH (pip spec; e.g. TORCH='torch==2.13.0
# --index-url https://download.pytorch.org/whl/cu126' for a GPU build), CORES, SNAKEMAKE_ARGS.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CORES ?= all
SNAKEMAKE_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Packages are installed without byte-compiling every file (--no-compile halves the install);
# Python then caches just the modules it imports, which needs bytecode writing switched on.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: install run test test-fast lint dry-run report ui clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile $(TORCH) -e ".[dev]"
	touch $@

install: $(STAMP)

run:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory install && \
	$(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS); rc=$$?; \
	echo "[tdabench] make run: $$(( $$(date +%s) - start )) s wall time (install included), exit $$rc"; \
	echo "[tdabench] results: results/summary.md   MLflow UI: make ui"; \
	exit $$rc

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not workflow and not browser"

lint: $(STAMP)
	$(BIN)/snakemake --lint

dry-run: $(STAMP)
	$(BIN)/snakemake -n $(SNAKEMAKE_ARGS)

report: $(STAMP)
	$(BIN)/snakemake --report results/report.html

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf results logs benchmarks mlflow.db mlartifacts .snakemake
