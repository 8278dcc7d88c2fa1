# Set-up and entry points. Each target creates the virtual environment it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned to a pair that installs together; override TORCH for another build.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests *.py
