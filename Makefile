# The README's two commands: `make run` and `make test`. Both create .venv when
# it is missing and install the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
# pytest-xdist workers for make test; --dist loadfile keeps each test file on one
# worker, so its module-scoped fixtures (a whole-DAG run, a local SLURM) are made
# once. (loadgroup would be finer, but xdist 3.8 cannot rename pytest 9's node ids,
# so its groups are silently ignored.)
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

.PHONY: run test test-quick lint format report tensorboard clean-results venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,slurm]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --cores 1 --report results/report.html

report: $(STAMP)
	$(BIN)/snakemake --cores 1 --report results/report.html

# Every training job's TensorBoard run (sweep trials side by side in the HParams tab).
tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir results/tensorboard

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check .
	$(BIN)/snakemake --lint --cores 1 2>&1 | tee /dev/stderr | (! grep -qiE "lints? for (rule|snakefile)")
	$(BIN)/snakemake --lint --cores 1 --configfile .test/config/config.yaml 2>&1 | tee /dev/stderr | (! grep -qiE "lints? for (rule|snakefile)")

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
	$(BIN)/snakefmt .

test: $(STAMP) lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile

clean-results:
	rm -rf results logs benchmarks .snakemake/metadata

# The quick loop: everything but the end-to-end workflow runs (marked slow).
test-quick: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile
