# Set-up and entry points. Each target creates the virtual environment it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned to a pair that installs together; override TORCH for another build.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install dev test lint train fashion-mnist bench

# The package (what training needs), then the tools of the tests on top (what `make test` needs).
install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Two workers (one per test file at a time): most tests wait on process start-up, not arithmetic.
test: dev
	$(PY) -m pytest -q -n 2 --dist loadfile

# Style, and the layers of docs/architecture.md (pyproject.toml's import-linter contract).
lint: dev
	$(VENV)/bin/ruff check src tests *.py
	$(VENV)/bin/lint-imports

# The quick start: a small VDVAE on Fashion-MNIST on the CPU (its time and figures: README).
train: install fashion-mnist
	$(PY) train.py

# Debian's dataset-fashion-mnist package, where apt is available and we are root; otherwise the
# data module finds the files in data/ or downloads them.
fashion-mnist:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) \
			|| echo "could not install dataset-fashion-mnist; the data module will look in data/fashion_mnist"; \
	fi

# Benchmark (docs/performance.md): our training step in fp32, channels_last and bf16, and with activation
# checkpointing, on the cifar10 preset at batch 8. Set ORIGINAL=/path/to/openai-vdvae to add the original.
bench: install
	$(PY) -m vdvae.bench --preset cifar10 --batch 8 --configs fp32 fp32-cl bf16-cl fp32-ckpt bf16-ckpt --allocated-memory \
		--repeats 3 --steps 3 --warmup 1 \
		$(if $(ORIGINAL),--original $(ORIGINAL)) --out bench.json
