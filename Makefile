# Two entry points that work on a fresh machine with Python 3.11 and no GPU:
#   make demo   install, train configs/digits.py, evaluate the 360 test digits
#   make test   install, type-check, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/digits_demo
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) main.py --config=configs/digits.py --workdir=$(WORKDIR) --mode=train
	$(PY) main.py --config=configs/digits.py --workdir=$(WORKDIR) --mode=eval_bpd

test: $(STAMP)
	$(PY) -m mypy  # the type checker, on diffode_jax/ (mypy.ini)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) runs
