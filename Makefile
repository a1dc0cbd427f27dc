# `make demo` and `make test` create .venv at the repo root when it is missing, install the
# project into it (again whenever pyproject.toml changes), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# TensorFlow takes one of two CPU paths: oneDNN's graph rewrites on (its default on AVX-512
# and AMX CPUs) or off (its default elsewhere). `make test ONEDNN=1` or `make test ONEDNN=0`
# runs the suite on the path named, on any x86-64 CPU; without it, the machine's default.
# `make test-other-path` runs the loader, scoring and flow tests not marked slow on the path
# this machine does not take by default (.ci/run does both).
ONEDNN ?=
ifneq ($(ONEDNN),)
export TF_ENABLE_ONEDNN_OPTS := $(ONEDNN)
endif

.PHONY: demo test test-quick test-other-path lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.score

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick: lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-other-path: $(STAMP)
	other=$$(env -u TF_ENABLE_ONEDNN_OPTS $(PY) -m loaders.cpu --other); \
	echo "TF_ENABLE_ONEDNN_OPTS=$$other: loader, scoring and flow tests (not slow)"; \
	TF_ENABLE_ONEDNN_OPTS=$$other $(PY) -m pytest -m "not slow" tests/loaders tests/tasks \
	    tests/flows $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf .demo .bench .pytest_cache .mypy_cache .ruff_cache
