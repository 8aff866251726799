# make setup : .venv with the pinned requirements, batchssl installed editable, Fashion-MNIST (idempotent)
# make demo  : setup, then the default pretraining run and both evaluators
# make test  : setup, then the whole test suite
# make lint  : the venv, then ruff's linter and its formatter's check (pyproject.toml [tool.ruff])
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FASHION_DEBIAN := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_RUN := runs/fashion_mnist/mocov3_bf

.PHONY: setup data demo test lint clean
setup: $(VENV)/.installed data

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

# Debian's dataset-fashion-mnist where apt-get runs as root (offline-friendly), else torchvision's download.
data: $(VENV)/.installed
	@if [ -f $(FASHION_DEBIAN) ] || [ -f data/FashionMNIST/raw/train-images-idx3-ubyte ]; then \
		echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist); \
	else \
		$(PY) -c "from torchvision.datasets import FashionMNIST as F; [F('data', train=t, download=True) for t in (True, False)]"; \
	fi

demo: setup
	$(VENV)/bin/accelerate launch --num_processes 1 pretrain.py output_dir=$(DEMO_RUN)
	$(PY) -m knn_eval --run $(DEMO_RUN)
	$(PY) -m linear_probe --run $(DEMO_RUN)
	$(PY) -m batchssl.report $(DEMO_RUN) --embedding

test: setup
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) *.egg-info
