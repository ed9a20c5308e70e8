# Two commands on a fresh machine:
#   make run    create the virtual environment, install, migrate, start the bot
#   make test   install the test extra, start PostgreSQL if needed, run ruff and the tests
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: run test lint bench fuzz install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip >/dev/null

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install "$(TORCH)"
	$(VENV)/bin/pip install -e ".[postgres]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(VENV)/bin/pip install -e ".[postgres,test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/atelier db upgrade
	$(VENV)/bin/atelier run

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install-test
	scripts/test

fuzz: install-test
	ATELIER_FUZZ=full HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -p no:cacheprovider -q -k "fuzz or never_raises" tests

bench: install-test
	$(VENV)/bin/python bench/run.py --out bench-results

clean:
	rm -rf $(VENV) data .pytest_cache
