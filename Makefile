# Two entry points: `make test` and `make demo`. Both create .venv and install into it.
# torch is pinned exactly: on the project's machines torch==2.13.0 resolves to a local CPU wheel,
# while a loose requirement would download GBs of CUDA packages. triton is pinned too: the interpreter
# and sm_90 compile tests run its compiler, and a new release must not turn CI red unannounced.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 triton==3.9.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Two workers (pytest-xdist): the machines have 2 cores, and the suite took 8m48s in one process
# against 6m06s-6m12s in two (2026-12-02).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

demo: $(STAMP)
	$(PY) -m routeformer.cli.demo

clean:
	rm -rf $(VENV) runs
